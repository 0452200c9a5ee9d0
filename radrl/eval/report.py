"""Writing one evaluation: metrics.json, metrics.md, metrics.csv, TensorBoard hparams/scalars, figures.

An evaluation is a dict:
    {"task": "cxrl" | "rrg", "checkpoint": str | None, "reports": int,
     "metrics": {model: {metric: value}}, "labels": {metric: label}, ...task extras}
where model is e.g. "anchor", "policy", "real" or "supervised".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from radrl.config import ExperimentConfig

HPARAMS = ("task", "seed", "learner.iterations", "learner.lr", "learner.lora_rank", "learner.ace_tokens", "rewards.rlcf",
           "rewards.lambda_align", "rewards.lambda_diag", "rewards.lambda_consist", "rewards.rrg_reward",
           "learner.adaptive_kl", "rollout.num_steps", "data.source")


def markdown_table(evaluation: dict) -> str:
    """Rows = metrics, columns = the evaluated models."""
    models = list(evaluation["metrics"])
    lines = ["| metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for key, label in evaluation["labels"].items():
        cells = [evaluation["metrics"][m].get(key) for m in models]
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


def hparams(cfg: ExperimentConfig) -> dict:
    """The config values that tell evaluated runs apart, flat, for TensorBoard's HPARAMS tab."""
    flat = {}
    for key in HPARAMS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def write_evaluation(evaluation: dict, cfg: ExperimentConfig, out_dir: Path) -> Path:
    """metrics.{json,md,csv} and TensorBoard events under out_dir; returns metrics.md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(evaluation, indent=1))
    table = markdown_table(evaluation)
    source = evaluation["checkpoint"] or "no checkpoint (the frozen base model)"
    (out_dir / "metrics.md").write_text(f"# radrl eval ({evaluation['task']}): {source}\n\n"
                                        f"{evaluation['reports']} held-out {'reports' if evaluation['task'] == 'cxrl' else 'images'}, "
                                        f"{evaluation['note']}\n\n{table}\n")
    with (out_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "metric", "value"])
        for model, values in evaluation["metrics"].items():
            for key, value in values.items():
                writer.writerow([model, key, value])
    with SummaryWriter(str(out_dir / "tensorboard")) as writer:
        scalars = {f"eval/{model}/{key}": value for model, values in evaluation["metrics"].items()
                   for key, value in values.items()}
        for key, value in scalars.items():
            writer.add_scalar(key, value, 0)
        writer.add_hparams(hparams(cfg), scalars, run_name="hparams")
    return out_dir / "metrics.md"
