"""`radrl compare-learners`: what DDPO and DRaFT-K reach at equal wall-clock budget.

Each cell of the comparison is a run folder (radrl/orchestration/ablate.py runs them). Its metrics.jsonl holds the
held-out checks (`heldout/…`, logging.eval_every) against training wall time and images generated; its
results.json holds the start, and its cell.json the end evaluation (`radrl eval`: AUROC, CLIP, r_align, FID,
MS-SSIM) with the real phantoms' scores of the same reports, the ceiling of "gap closed".
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

HISTORY_FILE = "metrics.jsonl"  # a run folder's per-iteration scalars (radrl.orchestration.tracking writes it)

CURVE_METRICS = (("heldout/auroc", "mean AUROC vs the report's labels", "diag"),
                 ("heldout/consist", "CLIP cosine", "consist"), ("heldout/align", "r_align", "align"))
AXES = (("time/train_seconds", "training wall time (min)", 1 / 60), ("time/images", "images generated", 1.0))


def gap_closed(result: dict, anchor: dict) -> float | None:
    """(policy − anchor) / (real − anchor) of the mean AUROC: the share of the way from the frozen base model to the
    reports' own images that the trained policy went (None without the real images' AUROC)."""
    real = (result.get("real") or {}).get("auroc")
    if real is None or real == anchor["auroc"]:
        return None
    return (result["metrics"]["auroc"] - anchor["auroc"]) / (real - anchor["auroc"])


def _spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):+.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"


def learner_summary(results: list[dict]) -> str:
    """Markdown: per learner, the share of the anchor → real AUROC gap closed and the AUROC, CLIP and r_align gained
    over the anchor per training minute and per 1,000 images (mean ± std over seeds)."""
    anchor = next((r["metrics"] for r in results if r["variant"] == "anchor"), None)
    if anchor is None:
        return ""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results if r["variant"] != "anchor"):
        mine = [r for r in results if r["variant"] == variant]
        cells = [_spread([gap_closed(r, anchor) for r in mine])]
        for per, key, scale in (("minute", "time/train_seconds", 1 / 60), ("1k images", "time/images", 1e-3)):
            for metric in ("auroc", "clip", "r_align"):
                cells.append(_spread([(r["metrics"][metric] - anchor[metric]) / (r["training"][key] * scale)
                                      for r in mine if r["training"].get(key)]))
        rows.append(f"| {variant} ({len(mine)} seeds) | " + " | ".join(cells) + " |")
    header = ("| learner | AUROC gap closed (anchor → real) | Δ AUROC / min | Δ CLIP / min | Δ r_align / min | "
              "Δ AUROC / 1k images | Δ CLIP / 1k images | Δ r_align / 1k images |")
    return "\n".join(["### Learners per minute and per image: mean ± std over seeds (Δ = policy − anchor at the end)",
                      "", header, "|---" * 8 + "|", *rows])


def cell_curves(folder: Path) -> dict[str, np.ndarray] | None:
    """One cell's held-out checks as arrays (the start evaluation at 0 s / 0 images first); None if it has none."""
    history_file, results_file = folder / HISTORY_FILE, folder / "results.json"
    if not history_file.is_file() or not results_file.is_file():
        return None
    history = [row for line in history_file.read_text().splitlines() if line
               and "heldout/total" in (row := json.loads(line))]
    if not history:
        return None
    start = json.loads(results_file.read_text())["start"]
    first = {"time/train_seconds": 0.0, "time/images": 0.0, "heldout/consist": start["consist"]["policy"],
             "heldout/align": start["align"]["policy"],
             "heldout/auroc": (start.get("diagnosis", {}).get("mean_auroc") or {}).get("policy", np.nan)}
    rows = [first, *history]
    keys = [key for key, _, _ in CURVE_METRICS] + [key for key, _, _ in AXES]
    return {key: np.array([row.get(key, np.nan) for row in rows], dtype=float) for key in keys}


def learner_curves(grid_dir: Path, path: Path) -> Path | None:
    """curves.png: each finished cell's held-out AUROC, CLIP and r_align against training minutes (top) and images
    generated (bottom), one colour per learner, one line per seed."""
    cells = []
    for cell_file in sorted(grid_dir.glob("cells/*/cell.json")):
        result = json.loads(cell_file.read_text())
        curves = cell_curves(cell_file.parent)
        if curves is not None:
            cells.append((result["variant"], result["seed"], curves))
    if not cells:
        return None
    colours = {variant: f"C{i}" for i, variant in enumerate(dict.fromkeys(v for v, _, _ in cells))}
    figure, axes = plt.subplots(len(AXES), len(CURVE_METRICS), figsize=(3.4 * len(CURVE_METRICS), 2.8 * len(AXES)),
                                squeeze=False)
    for row, (x_key, x_label, scale) in enumerate(AXES):
        for col, (y_key, y_label, _) in enumerate(CURVE_METRICS):
            ax = axes[row][col]
            for variant, seed, curves in cells:
                ax.plot(curves[x_key] * scale, curves[y_key], color=colours[variant], lw=1, alpha=0.8,
                        label=variant if seed == 0 else None)
            ax.set(xlabel=x_label, title=y_label)
            ax.title.set_fontsize(9)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("held-out (unseen reports, fixed noise) during training: one line per seed", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
