"""The papers' ablation grids: cells (one variant × one seed), how each runs, and the tables.

    CXRL:   anchor | full | w/o ACE | w/o RLCF        (Table 1)
            +align | +diag | +consist | all (= full)   (reward ablation, with FID)
    LM-RRG: w/o CQRL | BLEU-4 reward | fixed λ_KL | full

A cell trains its variant of the config in-process (`orchestration.local`) in its own run
folder, then evaluates the result with `radrl eval`'s code and writes cell.json
(`run_cell` in radrl/orchestration/ablate.py). A finished
cell (cell.json present) is never redone; an interrupted one resumes from its checkpoint.
LM-RRG's CQRL variants of a seed start from that seed's "w/o CQRL" cell, its supervised stage.
The CXRL anchor is frozen and every cell is evaluated on the same noise, so it is evaluated
once (its std over seeds is 0 by construction).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from radrl.config import ExperimentConfig, with_overrides
from radrl.eval.cxrl_eval import LABELS as CXRL_LABELS
from radrl.eval.rrg_eval import METRIC_LABELS as RRG_LABELS

log = logging.getLogger("radrl")


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table: config overrides, whether it trains, and which model's metrics form the row."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    train: bool = True
    model: str = "policy"
    starts_from: str | None = None  # rrg: the variant whose supervised stage this one continues
    seeded: bool = True  # False: the same for every seed, run once


CXRL_VARIANTS = (
    Variant("anchor", "anchor (frozen base)", train=False, model="anchor", seeded=False),
    Variant("full", "CXRL (full: LoRA + ACE, RLCF, all rewards)"),
    Variant("no_ace", "w/o ACE", ("learner.ace_tokens=0",)),
    Variant("no_rlcf", "w/o RLCF (direct feedback)", ("rewards.rlcf=false",)),
    Variant("align_only", "+align", ("rewards.lambda_diag=0", "rewards.lambda_consist=0")),
    Variant("diag_only", "+diag", ("rewards.lambda_align=0", "rewards.lambda_consist=0")),
    Variant("consist_only", "+consist", ("rewards.lambda_align=0", "rewards.lambda_diag=0")),
)
# `radrl compare-learners`: DDPO against reward backpropagation (DRaFT-K) on the same actors, rewards, anchor and
# evaluation, each cell stopped by the same wall-clock budget (learner.time_budget_minutes of its config).
LEARNER_VARIANTS = (
    Variant("anchor", "anchor (frozen base)", train=False, model="anchor", seeded=False),
    Variant("ddpo", "DDPO (the paper's learner)", ("learner.algorithm=ddpo",)),
    Variant("draft_k1", "DRaFT-1 (reward backprop, last step)", ("learner.algorithm=draft", "learner.draft_steps=1")),
    Variant("draft_k3", "DRaFT-3 (reward backprop, last 3 steps)", ("learner.algorithm=draft", "learner.draft_steps=3")),
)
RRG_VARIANTS = (
    Variant("supervised", "w/o CQRL (supervised only)", ("learner.iterations=0",), model="supervised"),
    Variant("bleu4", "BLEU-4 reward", ("rewards.rrg_reward=bleu4",), starts_from="supervised"),
    Variant("fixed_kl", "fixed λ_KL", ("learner.adaptive_kl=false",), starts_from="supervised"),
    Variant("full", "LM-RRG (full: RadCliQ reward, adaptive λ_KL)", starts_from="supervised"),
)
# Tables: (title, rows as variant names, columns as metric keys).
TABLES = {
    "cxrl": (("CXRL components (paper Table 1)", ("anchor", "full", "no_ace", "no_rlcf"),
              ("r_align", "auroc", "clip", "fid", "ms_ssim")),
             ("CXRL rewards (paper reward ablation)", ("align_only", "diag_only", "consist_only", "full"),
              ("r_align", "auroc", "clip", "fid"))),
    "learners": (("Learners at equal wall-clock budget (held-out, unseen reports)",
                  ("anchor", "ddpo", "draft_k1", "draft_k3"), ("r_align", "auroc", "clip", "fid", "ms_ssim")),),
    "rrg": (("LM-RRG ablation (paper Table 1)", ("supervised", "bleu4", "fixed_kl", "full"),
             ("bleu4", "meteor", "rouge_l", "ce_precision", "ce_recall", "ce_f1", "radcliq_v0", "radcliq_v1")),),
}
# The papers' numbers for the same rows (../shared/docs/references.md); MIMIC-CXR, full-size models.
PAPER = {
    "cxrl": {"anchor": {"r_align": -0.363, "auroc": 0.65, "clip": 0.285, "fid": 2.58, "ms_ssim": 0.197},
             "full": {"r_align": -0.246, "auroc": 0.81, "clip": 0.343, "fid": 1.51, "ms_ssim": 0.147},
             "no_ace": {"r_align": -0.354, "auroc": 0.66, "clip": 0.321},
             "no_rlcf": {"r_align": -0.319, "auroc": 0.71, "clip": 0.301},
             "align_only": {"fid": 1.89}, "diag_only": {"fid": 1.64}, "consist_only": {"fid": 1.92}},
    "rrg": {"full": {"bleu4": 0.122, "meteor": 0.165, "rouge_l": 0.296, "ce_precision": 0.500, "ce_recall": 0.500,
                     "ce_f1": 0.484, "radcliq_v1": 0.865},
            "supervised": {"radcliq_v1": 1.023}, "bleu4": {"radcliq_v1": 1.102}, "fixed_kl": {"radcliq_v1": 0.901}},
    "learners": {},  # neither paper compares learners
}
LABELS = {"cxrl": CXRL_LABELS, "rrg": RRG_LABELS, "learners": CXRL_LABELS}
GRIDS = {"cxrl": CXRL_VARIANTS, "rrg": RRG_VARIANTS, "learners": LEARNER_VARIANTS}


@dataclass(frozen=True)
class Cell:
    """One variant at one seed, run in its own folder."""

    task: str  # the grid's kind: cxrl, rrg or learners
    variant: Variant
    seed: int
    folder: Path

    @property
    def key(self) -> str:
        return cell_key(self.variant, self.seed)

    def config(self, base: ExperimentConfig, cells: dict[str, Cell]) -> ExperimentConfig:
        """The base config with this variant's overrides, its seed, its run folder, in-process roles."""
        overrides = [*self.variant.overrides, f"seed={self.seed}", f"logging.run_dir={self.folder}",
                     "orchestration.local=true"]
        if self.variant.starts_from:
            start = cells[f"{self.variant.starts_from}_seed{self.seed}"]
            overrides.append(f"learner.supervised_checkpoint={start.folder}")
        return with_overrides(base, overrides)


def grid(cfg: ExperimentConfig, seeds: int, out_dir: Path, only: tuple[str, ...] = (), kind: str | None = None
         ) -> dict[str, Cell]:
    """Every cell of the grid `kind` (default: the config's task's ablation) or of its `only` variants and what they
    start from, in an order where each cell comes after the one it starts from."""
    kind = kind or cfg.task
    chosen = variants(kind)
    if only:
        names = {v.name for v in chosen}
        if set(only) - names:
            raise ValueError(f"unknown {kind} variant(s) {sorted(set(only) - names)}; choose from {sorted(names)}")
        needed = set(only) | {v.starts_from for v in chosen if v.name in only and v.starts_from}
        chosen = tuple(v for v in chosen if v.name in needed)
    cells = {}
    for variant in chosen:
        for seed in range(seeds) if variant.seeded else (cfg.seed,):
            key = cell_key(variant, seed)
            cells[key] = Cell(kind, variant, seed, Path(out_dir) / "cells" / key)
    return cells


def variants(kind: str) -> tuple[Variant, ...]:
    """The rows of a grid: a task's ablation ('cxrl', 'rrg') or the learner comparison ('learners')."""
    return GRIDS[kind]


def variant_names(task: str) -> tuple[str, ...]:
    return tuple(v.name for v in variants(task))


def cell_key(variant: Variant, seed: int) -> str:
    return f"{variant.name}_seed{seed}" if variant.seeded else variant.name


def aggregate(results: list[dict], variant: str, metric: str) -> tuple[float, float, int] | None:
    """(mean, std over seeds (ddof 1; 0 for one run), runs) of a metric for a variant, or None if it has no run."""
    values = [r["metrics"][metric] for r in results if r["variant"] == variant and metric in r["metrics"]]
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def ablation_tables(task: str, results: list[dict], seeds: int) -> str:
    """Markdown: each of the task's tables, measured (mean ± std over seeds), then the paper's numbers."""
    labels, by_name = LABELS[task], {v.name: v for v in variants(task)}
    parts = []
    for title, rows, columns in TABLES[task]:
        header = "| | " + " | ".join(labels[c] for c in columns) + " |"
        lines = [f"### {title}: measured, mean ± std over {seeds} seed(s)", "", header, "|---" * (len(columns) + 1) + "|"]
        for row in rows:
            cells = []
            for column in columns:
                found = aggregate(results, row, column)
                cells.append("not run" if found is None else f"{found[0]:.4f} ± {found[1]:.4f}"
                             + (f" (n={found[2]})" if by_name[row].seeded and found[2] != seeds else ""))
            lines.append(f"| {by_name[row].label} | " + " | ".join(cells) + " |")
        if PAPER[task]:
            lines += ["", f"### {title}: the paper (MIMIC-CXR, full-size models)", "", header,
                      "|---" * (len(columns) + 1) + "|"]
            for row in rows:
                paper = PAPER[task].get(row, {})
                cells = [f"{paper[c]:.3f}" if c in paper else "–" for c in columns]
                lines.append(f"| {by_name[row].label} | " + " | ".join(cells) + " |")
        if task == "rrg":
            lines += ["", "The paper gives one RadCliQ without naming its version; it is shown in the v1 column."]
        parts.append("\n".join(lines))
    training = training_table(task, results)
    if training:
        parts.append(training)
    return "\n\n".join(parts)


# What each variant's training log shows, averaged over its iterations (cell.json "training"), then over seeds.
TRAINING_COLUMNS = {"cxrl": (("reward/total", "training reward (total)"),
                             ("reward/win_rate_vs_anchor", "win rate vs anchor"),
                             ("ddpo/advantage_abs", "mean |advantage|")),
                "learners": (("iterations", "iterations"), ("time/train_seconds", "training wall time (s)"),
                             ("time/images", "images generated"), ("reward/total", "training reward (total)"),
                             ("heldout/auroc", "held-out AUROC, last check")),
                    "rrg": (("reward/radcliq", "reward (RadCliQ)"), ("reward/bleu4", "reward (BLEU-4)"),
                            ("ppo/lambda_kl", "λ_KL"), ("ppo/kl", "KL to reference (nats/token)"),
                            ("ppo/entropy", "entropy (nats/token)"))}


def training_table(task: str, results: list[dict]) -> str:
    """Markdown: per variant, each training-log mean over iterations, as mean ± std over seeds ('' if none)."""
    by_name = {v.name: v for v in variants(task)}
    rows = [name for name in by_name if any(r["variant"] == name and r.get("training") for r in results)]
    if not rows:
        return ""
    columns = TRAINING_COLUMNS[task]
    lines = ["### Training logs: each variant's mean over its iterations, mean ± std over seeds", "",
             "| | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in rows:
        cells = []
        for key, _ in columns:
            values = [r["training"][key] for r in results if r["variant"] == name and key in r.get("training", {})]
            cells.append(f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"
                         if values else "–")
        lines.append(f"| {by_name[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_figure(task: str, results: list[dict], path: Path) -> None:
    """One panel per metric of the first table: each seed's value (dots), mean ± std over seeds (bar), axes zoomed
    to the data: the differences between rows are small next to the values."""
    title, rows, columns = TABLES[task][0]
    by_name = {v.name: v for v in variants(task)}
    figure, axes = plt.subplots(1, len(columns), figsize=(2.3 * len(columns), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for x, row in enumerate(rows):
            values = [r["metrics"][column] for r in results if r["variant"] == row and column in r["metrics"]]
            if values:
                ax.plot([x] * len(values), values, ".", color="grey", ms=4)
                ax.errorbar(x, np.mean(values), yerr=np.std(values), fmt="o", color="C1" if row == "full" else "C0",
                            capsize=3)
        ax.set_xticks(range(len(rows)), [by_name[r].label.split(" (")[0] for r in rows], rotation=40, ha="right",
                      fontsize=7)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_title(LABELS[task][column], fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    figure.suptitle(f"{title}: each seed (grey), mean ± std over seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
