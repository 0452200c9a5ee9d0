"""`radrl eval`: one checkpoint (or the frozen base model) → metrics table, CSV, TensorBoard, figures."""

from __future__ import annotations

import json
from pathlib import Path

from radrl.checkpoints import latest_checkpoint, training_changes
from radrl.config import ExperimentConfig

MODELS = {"cxrl": ("anchor", "policy"), "rrg": ("supervised", "policy")}


def resolve_checkpoint(path: Path | None) -> Path | None:
    """A checkpoint folder as given; for a run folder, the checkpoint its finished run kept (results.json's
    kept_checkpoint: LM-RRG's validation selection may keep an earlier CQRL iteration than the last), else its
    latest; a clear error for anything else."""
    if path is None:
        return None
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    results = path / "results.json"
    kept = json.loads(results.read_text()).get("kept_checkpoint") if results.is_file() else None
    if kept is not None and (path / kept / "state.json").is_file():
        return path / kept
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"--checkpoint {path}: neither a checkpoint folder (with state.json) nor a run folder "
                                "with checkpoints/iter_*; give the run folder of a `radrl train` run")
    return latest


def checkpoint_config(path: Path, overrides: list[str]) -> ExperimentConfig:
    """The config a checkpoint was trained with (its state.json), with `--set` overrides."""
    from radrl.config import apply_overrides

    state = json.loads((resolve_checkpoint(path) / "state.json").read_text())
    return ExperimentConfig.model_validate(apply_overrides(state["config"], overrides))


def default_models(cfg: ExperimentConfig, checkpoint: Path | None) -> tuple[str, ...]:
    """What to compare: the frozen base model and, when a checkpoint is given, its policy."""
    if cfg.task == "cxrl":
        return ("anchor", "policy") if checkpoint else ("anchor",)
    if checkpoint is None:
        raise ValueError("LM-RRG has no model without training: give --checkpoint (a run folder or checkpoint folder)")
    stage = json.loads((checkpoint / "state.json").read_text()).get("learner", {}).get("stage")
    return ("supervised", "policy") if stage == "rl" else ("supervised",)


def run_evaluation(cfg: ExperimentConfig, checkpoint: Path | None, models: tuple[str, ...] | None = None,
                   out_dir: Path | None = None) -> tuple[dict, Path]:
    """Evaluate, write everything under out_dir (default <run_dir>/eval/<checkpoint>); returns (evaluation, table)."""
    from radrl.eval.report import write_evaluation

    checkpoint = resolve_checkpoint(checkpoint)
    if checkpoint is not None:
        details = training_changes(json.loads((checkpoint / "state.json").read_text())["config"],
                                   cfg.model_dump(mode="json"))
        if details:
            raise ValueError(f"--checkpoint {checkpoint} was trained under a different config ({details}); evaluate "
                             "it with the config it was trained with (its state.json holds it)")
    models = models or default_models(cfg, checkpoint)
    unknown = set(models) - set(MODELS[cfg.task])
    if unknown or ("policy" in models and checkpoint is None):
        raise ValueError(f"--model {', '.join(models)}: a {cfg.task} evaluation compares {' and '.join(MODELS[cfg.task])}"
                         " ('policy' needs --checkpoint)")
    out_dir = Path(out_dir or Path(cfg.logging.run_dir) / "eval" / (checkpoint.name if checkpoint else "base_model"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.task == "cxrl":
        from radrl.eval.cxrl_eval import evaluate_cxrl, write_cxrl_figures

        evaluation, shown = evaluate_cxrl(cfg, checkpoint, models)
        write_cxrl_figures(evaluation, shown, out_dir)
    else:
        from radrl.eval.rrg_eval import evaluate_rrg, write_rrg_samples

        evaluation, texts = evaluate_rrg(cfg, checkpoint, models)
        write_rrg_samples(texts, cfg.evaluation.shown, out_dir)
    return evaluation, write_evaluation(evaluation, cfg, out_dir)
