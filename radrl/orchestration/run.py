"""Start the roles, run the driver, stop the roles: what `radrl train` does."""

from __future__ import annotations

import logging
import time

from radrl.config import ExperimentConfig
from radrl.orchestration.actors import run_id, start_roles
from radrl.orchestration.driver import CXRLTrainer, format_results_table
from radrl.orchestration import rrg_driver

log = logging.getLogger("radrl")


def run_training(cfg: ExperimentConfig, resume: bool = False) -> str:
    """Train a config end to end (CXRL, or LM-RRG's supervised + CQRL stages); returns the results table (Markdown)."""
    start = time.perf_counter()
    mode = ("in-process" if cfg.orchestration.local else
            f"Ray ({cfg.orchestration.address or 'new local instance'}, run id {run_id(cfg)})")
    unit = "images" if cfg.task == "cxrl" else "reports"
    log.info("radrl train (%s): %s, %d rollout worker(s), %d iterations × %d %s, run folder %s", cfg.task,
             mode, cfg.rollout.num_workers, cfg.learner.iterations,
             cfg.rollout.trajectories_per_iteration, unit, cfg.logging.run_dir)
    roles = start_roles(cfg)
    try:
        trainer = (CXRLTrainer if cfg.task == "cxrl" else rrg_driver.RRGTrainer)(cfg, roles, resume=resume)
        log.info("roles ready in %.0f s", time.perf_counter() - start)
        results = trainer.run()
    finally:
        roles.cluster.shutdown()
    table = format_results_table(results) if cfg.task == "cxrl" else rrg_driver.format_results_table(results)
    log.info("done in %.0f s; results, curves and grids in %s", time.perf_counter() - start, cfg.logging.run_dir)
    return table
