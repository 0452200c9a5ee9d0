"""LM-RRG evaluation (the paper's Table 1): greedy reports of held-out images, supervised model vs policy.

Per model: BLEU-4 (nltk), METEOR (nltk, exact + stem), ROUGE-L (rouge-score), clinical efficacy
precision / recall / F1 over the 14 observations (the project's labeler), and RadCliQ v0 / v1
with each feature and the name of the backend that produced it. "supervised" is the model after
the supervised stage (for a CQRL checkpoint: its RL LoRA switched off, the frozen reference).
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from radrl.checkpoints import load_checkpoint
from radrl.config import ExperimentConfig
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label
from radrl.data.pairs import image_report_pairs
from radrl.data.report_pool import report_pool
from radrl.eval.text_metrics import nlg_and_ce
from radrl.models.report_generator import ReportPolicy, build_report_policy
from radrl.progress import progress
from radrl.reward_actors.radcliq import FEATURES, RadCliQScorer, generated_labels
from radrl.rollout.worker import device_for

log = logging.getLogger("radrl")

METRIC_LABELS = {"bleu4": "BLEU-4", "meteor": "METEOR (exact+stem)", "rouge_l": "ROUGE-L",
                 "ce_precision": "CE precision", "ce_recall": "CE recall", "ce_f1": "CE F1",
                 "radcliq_v0": "RadCliQ v0 ↓", "radcliq_v1": "RadCliQ v1 ↓"}


def report_summary(texts: list[str], references: list[str], radcliq_scores: dict[str, np.ndarray]) -> dict:
    """NLG, CE and mean RadCliQ (+ features) of generated reports; per-report RadCliQ kept for paired errors."""
    summary = nlg_and_ce(texts, references)
    summary.update({name: float(np.mean(values)) for name, values in radcliq_scores.items()})
    summary["per_report"] = {f"radcliq_{v}": radcliq_scores[f"radcliq_{v}"].tolist() for v in ("v0", "v1")}
    return summary


def load_report_policy(cfg: ExperimentConfig, checkpoint: Path) -> ReportPolicy:
    """The report policy of an LM-RRG checkpoint: supervised stage, or CQRL (supervised + RL LoRA)."""
    tensors, state = load_checkpoint(checkpoint)
    stage = state.get("learner", {}).get("stage")
    if stage is None:
        raise ValueError(f"{checkpoint} is not an LM-RRG checkpoint (no learner stage); is it a CXRL one?")
    policy = build_report_policy(cfg, device_for(cfg.learner.resources.num_gpus)).eval()
    supervised = {k.removeprefix("supervised/"): v for k, v in tensors.items() if k.startswith("supervised/")}
    if stage == "rl":
        policy.start_rl(supervised)
        policy.load_rl_state({k.removeprefix("rl/"): v for k, v in tensors.items() if k.startswith("rl/")})
    else:
        policy.load_supervised_state(supervised)
    return policy


def greedy(policy: ReportPolicy, images: np.ndarray, model: str, batch_size: int) -> list[str]:
    """Greedy reports of `model` ('policy', or 'supervised': the RL LoRA off) for images [N, 1, S, S]."""
    device = next(policy.parameters()).device
    texts = []
    for start in progress(range(0, len(images), batch_size), desc=f"greedy reports, {model}", unit="batch"):
        batch = torch.from_numpy(images[start:start + batch_size]).to(device)
        if model == "supervised" and policy.stage == "rl":
            with policy.reference():
                texts += policy.generator.greedy_reports(batch)
        else:
            texts += policy.generator.greedy_reports(batch)
    return texts


def evaluate_rrg(cfg: ExperimentConfig, checkpoint: Path, models: tuple[str, ...]) -> tuple[dict, dict]:
    """Evaluate `models` (of 'supervised', 'policy') → (evaluation dict, generated texts by model)."""
    held = image_report_pairs(cfg.data, "test", cfg.evaluation.reports)
    references = list(held.reports)
    policy = load_report_policy(cfg, checkpoint)
    if "policy" in models and policy.stage != "rl":
        raise ValueError(f"{checkpoint} is from the supervised stage: evaluate --model supervised, "
                         "or give a checkpoint from CQRL")
    log.info("radrl eval (rrg): %d held-out images, models %s, checkpoint %s", len(references), ", ".join(models),
             checkpoint)
    scorer = RadCliQScorer(cfg.rewards, report_pool(cfg.data, "train"), device_for(cfg.rewards.resources.num_gpus))
    metrics, texts = {}, {}
    for model in models:
        texts[model] = greedy(policy, held.images, model, cfg.rollout.batch_size)
        summary = report_summary(texts[model], references, scorer.score(texts[model], references))
        summary.pop("per_report")
        metrics[model] = summary
        log.info("  %-10s %s", model, "  ".join(f"{k} {summary[k]:.4f}" for k in METRIC_LABELS))
    labels = METRIC_LABELS | {f: f"RadCliQ feature: {scorer.names[f]}" for f in FEATURES}
    evaluation = {"task": "rrg", "checkpoint": str(checkpoint), "reports": len(references),
                  "note": "greedy decoding; CE: labeler POSITIVE, example-based; RadCliQ backends: "
                          + "; ".join(f"{k} = {v}" for k, v in scorer.names.items()),
                  "metrics": metrics, "labels": labels, "backends": dict(scorer.names)}
    return evaluation, {"references": references, **texts}


def differing_labels(generated: str, reference: str) -> list[str]:
    """Observations the labeler marks POSITIVE in one report and not the other ('+x' only generated, '−x' missed)."""
    ours, theirs = generated_labels([generated])[0] == Label.POSITIVE, generated_labels([reference])[0] == Label.POSITIVE
    return ([f"+{n}" for n, a, b in zip(CHEXPERT_OBSERVATIONS, ours, theirs) if a and not b]
            + [f"−{n}" for n, a, b in zip(CHEXPERT_OBSERVATIONS, ours, theirs) if b and not a])


def write_rrg_samples(texts: dict, shown: int, out_dir: Path) -> None:
    """samples.md and samples.png: reference vs each model's report, with the labels that differ."""
    references = texts["references"]
    models = [m for m in texts if m != "references"]
    lines = ["# Held-out samples (greedy)", ""]
    for i in range(min(shown, len(references))):
        lines += [f"## {i + 1}", f"- reference: {references[i]}"]
        for model in models:
            diff = differing_labels(texts[model][i], references[i])
            lines.append(f"- {model}: {texts[model][i]}  \n  labels that differ: {', '.join(diff) or 'none'}")
        lines.append("")
    (out_dir / "samples.md").write_text("\n".join(lines))
    count = min(shown, len(references))
    figure, axes = plt.subplots(count, 1 + len(models), figsize=(4.2 * (1 + len(models)), 1.2 * count), squeeze=False)
    for i in range(count):
        cells = [("reference", references[i], "")]
        cells += [(model, texts[model][i], ", ".join(differing_labels(texts[model][i], references[i])) or "none")
                  for model in models]
        for ax, (name, text, diff) in zip(axes[i], cells):
            body = textwrap.fill(textwrap.shorten(text or "(empty)", 330), 60)
            if name != "reference":
                body += "\n" + textwrap.fill(f"labels that differ: {diff}", 60)
            ax.text(0, 1, body, va="top", ha="left", fontsize=6, family="monospace")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=9, loc="left")
    figure.suptitle("held-out images: reference report vs generated (+ only generated, − missed)", fontsize=9)
    figure.tight_layout()
    figure.savefig(out_dir / "samples.png", dpi=110)
    plt.close(figure)
