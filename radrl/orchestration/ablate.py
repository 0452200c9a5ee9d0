"""`radrl ablate`: every cell of one or more ablation grids as Ray tasks (or one by one in this process).

Cells of all grids share one Ray instance, so a 2-CPU machine runs two cells at a time whichever
grid they belong to. An LM-RRG CQRL cell gets its seed's supervised cell's result as an argument:
Ray starts it only once that cell has finished. Each cell logs to <cell>/log.txt; the console
shows one line per finished cell.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from radrl.config import ExperimentConfig, with_current_defaults
from radrl.eval.ablation import Cell, ablation_figure, ablation_tables, grid, variant_names
from radrl.orchestration.actors import init_ray
from radrl.progress import progress

log = logging.getLogger("radrl")


@contextmanager
def cell_log(folder: Path):
    """Send radrl's INFO log to <folder>/log.txt (not the console) while a cell runs."""
    folder.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("radrl")
    handler = logging.FileHandler(folder / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def run_cell(cell: Cell, base: ExperimentConfig, cells: dict[str, Cell], threads: int) -> dict:
    """Train (resuming if interrupted) and evaluate one cell; returns and writes its cell.json. Idempotent."""
    import torch

    from radrl.checkpoints import latest_checkpoint
    from radrl.eval.run import run_evaluation
    from radrl.orchestration.run import run_training

    done = cell.folder / "cell.json"
    cfg = cell.config(base, cells)
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k != "orchestration"}  # where it ran: free
    if done.is_file():
        result = json.loads(done.read_text())
        saved = result.get("config") or {}
        saved = {k: v for k, v in with_current_defaults({**saved, "orchestration": {}}).items() if k != "orchestration"}
        if saved != settings:
            raise ValueError(f"{done} holds results of another config; delete {cell.folder} to recompute this cell, "
                             "or give the ablation another --out")
        return result
    torch.set_num_threads(threads)
    cell.folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if cell.variant.train:
        run_training(cfg, resume=latest_checkpoint(cell.folder) is not None)
    evaluation, _ = run_evaluation(cfg, cell.folder if cell.variant.train else None, (cell.variant.model,),
                                   cell.folder / "eval")
    result = {"cell": cell.key, "variant": cell.variant.name, "seed": cell.seed, "model": cell.variant.model,
              "metrics": evaluation["metrics"][cell.variant.model], "seconds": time.perf_counter() - start,
              "real": evaluation["metrics"].get("real"),  # the reports' own images: the ceiling
              "training": training_summary(cell.folder), "backends": evaluation.get("backends"), "config": settings}
    staging = done.with_suffix(f".tmp{os.getpid()}")
    staging.write_text(json.dumps(result, indent=1))
    os.replace(staging, done)  # atomic: a cell.json is always complete
    return result


# Scalars of a cell's training log that show what its variant changed (LM-RRG: the KL weight really differs
# between adaptive and fixed λ_KL; CXRL: the reward the update saw).
TRAINING_KEYS = ("ppo/lambda_kl", "ppo/kl", "ppo/entropy", "reward/radcliq", "reward/bleu4", "reward/total",
                 "ddpo/advantage_abs", "reward/win_rate_vs_anchor")
LAST_KEYS = ("time/train_seconds", "time/images", "heldout/auroc", "heldout/total")  # running totals, checks: the last


def training_summary(folder: Path) -> dict[str, float]:
    """Mean over the cell's CQRL/DDPO iterations of each TRAINING_KEYS scalar it logged, the last value of each
    LAST_KEYS one, and the iteration count (empty if it did not train)."""
    from radrl.orchestration.tracking import HISTORY_FILE, read_history

    rows = read_history(folder / HISTORY_FILE)
    found = {"iterations": float(len(rows))} if rows else {}
    for keys, reduce in ((TRAINING_KEYS, np.mean), (LAST_KEYS, lambda values: values[-1])):
        for key in keys:
            values = [row[key] for row in rows if key in row]
            if values:
                found[key] = float(reduce(values))
    return found


# ---------------------------------------------------------------------------- tables


def cell_task(cell: Cell, base: ExperimentConfig, cells: dict[str, Cell], threads: int, after: dict | None = None):
    """The body of one cell's Ray task (or local call); `after` is the result of the cell it starts from."""
    with cell_log(cell.folder):
        return run_cell(cell, base, cells, threads)


def brief(result: dict) -> str:
    keys = ("r_align", "auroc", "clip", "fid") if "fid" in result["metrics"] else ("bleu4", "ce_f1", "radcliq_v1")
    return "  ".join(f"{k} {result['metrics'][k]:.4f}" for k in keys if k in result["metrics"])


def run_ablation(grids: dict[str, ExperimentConfig], seeds: int, out_dir: Path, local: bool = False,
                 cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, only: tuple[str, ...] = (),
                 kinds: dict[str, str] | None = None) -> str:
    """Run every unfinished cell of each grid (name → config; `only`: just these variants and what they start
    from; `kinds`: name → grid kind, default the config's task's ablation), then write and return the tables."""
    start = time.perf_counter()
    kinds = {name: (kinds or {}).get(name, cfg.task) for name, cfg in grids.items()}
    known = {v for name in grids for v in variant_names(kinds[name])}
    if set(only) - known:
        raise ValueError(f"unknown variant(s) {sorted(set(only) - known)}; choose from {sorted(known)}")
    all_cells = {}
    for name, cfg in grids.items():
        mine = tuple(v for v in only if v in variant_names(kinds[name]))
        if mine or not only:
            all_cells[name] = grid(cfg, seeds, Path(out_dir) / name, mine, kinds[name])
    grids = {name: grids[name] for name in all_cells}
    jobs = [(name, cell) for name, cells in all_cells.items() for cell in cells.values()]
    finished = sum((cell.folder / "cell.json").is_file() for _, cell in jobs)
    log.info("radrl ablate: %d cells (%s), %d already finished, %s", len(jobs),
             ", ".join(f"{name}: {len(cells)}" for name, cells in all_cells.items()), finished,
             "in-process" if local else f"Ray tasks of {cpus_per_cell:g} CPU each")
    threads = max(1, int(cpus_per_cell))
    results, failures = {}, {}

    def done(name: str, cell: Cell, outcome) -> None:
        if isinstance(outcome, Exception):
            failures[cell.folder] = outcome
            log.warning("cell %s/%s failed: %s", name, cell.key, str(outcome).strip().splitlines()[-1])
        else:
            results.setdefault(name, []).append(outcome)
            log.info("[%d/%d] %s/%s (%.0f s): %s", sum(map(len, results.values())) + len(failures), len(jobs), name,
                     cell.key, outcome["seconds"], brief(outcome))

    if local:
        for name, cell in progress(jobs, desc="ablation cells", unit="cell"):
            try:
                outcome = cell_task(cell, grids[name], all_cells[name], threads)
            except Exception as error:  # one failed cell must not lose the others
                outcome = error
            done(name, cell, outcome)
    else:
        run_on_ray(jobs, grids, all_cells, threads, cpus_per_cell, gpus_per_cell, done)
    tables = write_tables(grids, results, seeds, Path(out_dir), kinds)
    log.info("ablation done in %.0f s; tables in %s", time.perf_counter() - start, Path(out_dir) / "ablation.md")
    if failures:
        listing = "; ".join(f"{folder}: {str(error).strip().splitlines()[-1]}" for folder, error in failures.items())
        raise RuntimeError(f"{len(failures)} cell(s) failed ({listing}). Finished cells are kept: fix the cause and "
                           "rerun the same command, which runs only the unfinished cells (see each cell's log.txt)")
    return tables


def run_on_ray(jobs, grids, all_cells, threads, cpus_per_cell, gpus_per_cell, done) -> None:
    """Submit every cell as a Ray task (dependent cells take their prerequisite's result ref) and collect them."""
    import ray

    init_ray(grids[next(iter(grids))].orchestration.address, os.cpu_count() or 1, dashboard=False,
             log_to_driver=False)
    try:
        task = ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=0)(cell_task)
        refs, owners = {}, {}
        for name, cell in jobs:
            after = refs.get((name, f"{cell.variant.starts_from}_seed{cell.seed}"))
            ref = task.options(name=f"radrl-ablate-{name}-{cell.key}").remote(cell, grids[name], all_cells[name],
                                                                              threads, after)
            refs[(name, cell.key)], owners[ref] = ref, (name, cell)
        remaining, bar = list(owners), progress(desc="ablation cells", total=len(owners), unit="cell")
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            bar.update()
            name, cell = owners[ready[0]]
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as error:
                outcome = error
            done(name, cell, outcome)
    finally:
        ray.shutdown()


def write_tables(grids: dict[str, ExperimentConfig], results: dict[str, list[dict]], seeds: int, out_dir: Path,
                 kinds: dict[str, str]) -> str:
    """ablation.md (all tables), ablation.json / ablation.csv (every cell), <grid>/ablation.png (and, for the
    learner comparison, <grid>/curves.png and its gap-closed lines)."""
    from radrl.eval.learners import learner_curves, learner_summary

    parts, rows = [], []
    for name, cfg in grids.items():
        kind, found = kinds[name], sorted(results.get(name, []), key=lambda r: (r["variant"], r["seed"]))
        parts.append(f"## {name} ({kind}, {len(found)} cells)\n\n" + ablation_tables(kind, found, seeds))
        if found:
            ablation_figure(kind, found, Path(out_dir) / name / "ablation.png")
        if kind == "learners" and found:
            parts.append(learner_summary(found))
            learner_curves(Path(out_dir) / name, Path(out_dir) / name / "curves.png")
        rows += [{"grid": name, **r} for r in found]
    tables = "\n\n".join(parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.md").write_text(tables + "\n")
    (out_dir / "ablation.json").write_text(json.dumps(rows, indent=1))
    with (out_dir / "ablation.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["grid", "variant", "seed", "metric", "value"])
        for row in rows:
            for metric, value in row["metrics"].items():
                writer.writerow([row["grid"], row["variant"], row["seed"], metric, value])
    return tables
