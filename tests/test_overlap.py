"""Overlapped sampling: iteration k+1 is sampled while k trains, one weight version stale, in-process and on Ray."""

import pytest

from radrl.config import ConfigError, load_config
from radrl.orchestration.actors import start_roles
from radrl.orchestration.bench import format_overlap, overlap_curves
from radrl.orchestration.driver import CXRLTrainer

SMALL = {"rollout.num_steps": 2, "rollout.batch_size": 4, "learner.batch_size": 4, "learner.iterations": 3,
         "learner.stat_buffer_size": 4, "learner.stat_min_count": 2, "logging.eval_reports": 4,
         "logging.image_every": 10, "logging.checkpoint_every": 10, "orchestration.overlap": True,
         "orchestration.max_staleness": 1, "orchestration.dashboard": False}


def run(tmp_path, **overrides):
    settings = dict(SMALL, **{"logging.run_dir": str(tmp_path)}, **overrides)
    cfg = load_config(None, [f"{k}={v}" for k, v in settings.items()])
    roles = start_roles(cfg)
    try:
        trainer = CXRLTrainer(cfg, roles)
        results = trainer.run()
        return results, [h["rollout/staleness"] for h in trainer.tracker.history()]
    finally:
        roles.cluster.shutdown()


def test_overlap_needs_staleness():
    with pytest.raises(ConfigError, match="max_staleness to 1"):
        load_config(None, ["orchestration.overlap=true"])


def test_overlapped_batches_are_one_version_behind_in_process(tmp_path):
    results, staleness = run(tmp_path, **{"orchestration.local": True})
    assert results["iterations"] == 3 and results["weight_version"] == 3
    assert staleness == [0.0, 1.0, 1.0]  # the first batch is sampled before any update


@pytest.mark.slow
def test_overlapped_batches_on_ray_with_two_workers(tmp_path):
    results, staleness = run(tmp_path, **{"rollout.num_workers": 2})
    assert results["iterations"] == 3 and results["weight_version"] == 3
    assert staleness == [0.0, 1.0, 1.0]


@pytest.mark.slow
def test_overlap_curves_compare_both_settings_and_reuse_finished_runs(tmp_path):
    settings = {k: v for k, v in SMALL.items() if not k.startswith("orchestration.")}
    cfg = load_config(None, [*(f"{k}={v}" for k, v in settings.items()), "orchestration.local=true",
                             "learner.iterations=2", "logging.eval_reports=2"])
    report = overlap_curves(cfg, seeds=(0,), out_dir=tmp_path)
    runs = report["runs"]
    assert runs["sequential-seed0"]["history"]["rollout/staleness"] == [0.0, 0.0]
    assert runs["overlap-seed0"]["history"]["rollout/staleness"] == [0.0, 1.0]
    assert (tmp_path / "overlap_curves.png").stat().st_size > 0 and (tmp_path / "overlap_curves.json").is_file()
    assert report["summary"]["iteration_speedup"] > 0 and "overlap iteration speed-up" in format_overlap(report)
    finished = (tmp_path / "overlap-seed0" / "results.json").stat().st_mtime_ns
    again = overlap_curves(cfg, seeds=(0,), out_dir=tmp_path)  # finished runs are read back, not retrained
    assert (tmp_path / "overlap-seed0" / "results.json").stat().st_mtime_ns == finished
    assert again["summary"] == report["summary"]
