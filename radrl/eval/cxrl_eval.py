"""CXRL evaluation (the paper's Table 1): generated X-rays of held-out reports, anchor vs policy.

One seeded image per report for each model, from identical noise (x_T and every DDIM step), so
the models' differences are the weights' doing. Per model:
- r_align: mean and std of the frozen posture regressor's alignment reward;
- AUROC: the diagnostic classifier's probabilities on the generated images against the
  report's labels (labeler; uncertain left out), per class and averaged;
- CLIP similarity: cosine of the image and its report in the frozen CLIP;
- FID: against the held-out reports' own images (embedded world: their rendered phantoms),
  on the classifier's DenseNet features;
- MS-SSIM: among `diversity_samples` samples of each of the first `diversity_reports` reports.
The held-out images themselves are scored too ("real"): what a perfect generator would get.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from radrl.checkpoints import load_checkpoint
from radrl.config import ExperimentConfig
from radrl.data.embedded import stable_seed
from radrl.data.pairs import image_report_pairs
from radrl.eval.figures import image_grid_figure
from radrl.eval.image_metrics import fid, ms_ssim_diversity, per_class_auroc
from radrl.models.diffusion_policy import PublishedWeights
from radrl.progress import progress
from radrl.reward_actors.rewards import ConsistencyReward, DiagnosisReward, PostureReward, report_targets
from radrl.rollout.worker import RolloutWorker

log = logging.getLogger("radrl")

LABELS = {"r_align": "r_align (mean) ↑", "r_align_std": "r_align (std)", "auroc": "AUROC (mean over classes) ↑",
          "clip": "CLIP similarity ↑", "fid": "FID (DenseNet features) ↓", "ms_ssim": "MS-SSIM (same report) ↓"}


class CXRLScorers:
    """The three frozen reward models, reused as evaluation models."""

    def __init__(self, cfg: ExperimentConfig):
        self.posture, self.diagnosis, self.clip = (PostureReward(cfg.models), DiagnosisReward(cfg.models),
                                                   ConsistencyReward(cfg.models))

    def score(self, images: torch.Tensor, reports: list[str]) -> tuple[dict[str, float], dict[str, float]]:
        """(r_align mean/std, AUROC mean, CLIP similarity) and the per-class AUROC of one image per report."""
        align, _ = self.posture(images, reports)
        _, info = self.diagnosis(images, reports)
        auroc = per_class_auroc(info["probabilities"], report_targets(reports, self.diagnosis.class_names),
                                self.diagnosis.class_names)
        clip, _ = self.clip(images, reports)
        return {"r_align": float(align.mean()), "r_align_std": float(align.std()), "auroc": auroc["mean"],
                "clip": float(clip.mean())}, auroc


def evaluation_worker(cfg: ExperimentConfig, checkpoint: Path | None) -> RolloutWorker:
    """A rollout worker holding the checkpoint's LoRA + ACE (or its initial ones, for the anchor alone)."""
    worker = RolloutWorker(cfg)
    if checkpoint is None:
        worker.load_weights(PublishedWeights(0, {k: v.numpy() for k, v in worker.policy.trainable_state().items()}))
        return worker
    tensors, state = load_checkpoint(checkpoint)
    worker.load_weights(PublishedWeights.from_checkpoint(tensors, state, str(checkpoint)))
    return worker


def generate(worker: RolloutWorker, reports: list[str], seed: int, model: str) -> torch.Tensor:
    """One image per report from `model` ('policy' or 'anchor'), batch k seeded by (seed, k): the same noise for both."""
    size, parts = worker.cfg.rollout.batch_size, []
    starts = range(0, len(reports), size)
    for k, start in enumerate(progress(starts, desc=f"sampling {model}", unit="batch")):
        batch, batch_seed = reports[start:start + size], stable_seed("eval", seed, k)
        if model == "anchor":
            with worker.policy.anchor():
                parts.append(worker.generate(batch, batch_seed, batch_seed + 1).images.cpu())
        else:
            parts.append(worker.generate(batch, batch_seed, batch_seed + 1).images.cpu())
    return torch.cat(parts)


def evaluate_cxrl(cfg: ExperimentConfig, checkpoint: Path | None, models: tuple[str, ...]) -> tuple[dict, dict]:
    """Evaluate `models` (of 'anchor', 'policy') → (evaluation dict, figure images). See the module docstring."""
    settings = cfg.evaluation
    held = image_report_pairs(cfg.data, "test", settings.reports)
    reports, real = list(held.reports), torch.from_numpy(held.images)
    log.info("radrl eval (cxrl): %d held-out reports, models %s, checkpoint %s", len(reports), ", ".join(models),
             checkpoint or "none")
    scorers = CXRLScorers(cfg)
    worker = evaluation_worker(cfg, checkpoint)
    metrics, per_class, images = {}, {}, {"real": real}
    metrics["real"], per_class["real"] = scorers.score(real, reports)
    repeated = [r for r in reports[:settings.diversity_reports] for _ in range(settings.diversity_samples)]
    for model in models:
        images[model] = generate(worker, reports, cfg.logging.eval_seed, model)
        metrics[model], per_class[model] = scorers.score(images[model], reports)
        metrics[model]["fid"] = fid(real, images[model], scorers.diagnosis.model)
        groups = generate(worker, repeated, cfg.logging.eval_seed + 1, model)
        metrics[model]["ms_ssim"] = ms_ssim_diversity(groups.view(-1, settings.diversity_samples, *groups.shape[1:]))
        log.info("  %-7s %s", model, "  ".join(f"{k} {v:.4f}" for k, v in metrics[model].items()))
    evaluation = {"task": "cxrl", "checkpoint": str(checkpoint) if checkpoint else None, "reports": len(reports),
                  "note": (f"one image each (DDIM {cfg.rollout.num_steps} steps, guidance {cfg.rollout.guidance_scale}, "
                           f"identical noise for every model); 'real' = the reports' own images; MS-SSIM over "
                           f"{settings.diversity_samples} samples of {min(settings.diversity_reports, len(reports))} "
                           "reports"),
                  "metrics": metrics, "labels": LABELS, "per_class_auroc": per_class}
    return evaluation, {name: batch[:settings.shown] for name, batch in images.items()} | {"reports": reports}


def write_cxrl_figures(evaluation: dict, shown: dict, out_dir: Path) -> None:
    """auroc.png (per-class bars per model) and samples.png (report; real, anchor, policy images)."""
    per_class = evaluation["per_class_auroc"]
    classes = [c for c in per_class["real"] if c != "mean"]
    models = list(per_class)
    figure, ax = plt.subplots(figsize=(1.0 + 0.75 * len(classes), 3.4))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [per_class[model].get(c, np.nan) for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, values, width, label=f"{model} (mean {per_class[model]['mean']:.3f})")
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=35, ha="right", fontsize=7)
    ax.axhline(0.5, color="grey", lw=0.6, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("classifier AUROC on generated images vs the report's labels", fontsize=9)
    figure.tight_layout()
    figure.savefig(out_dir / "auroc.png", dpi=110)
    plt.close(figure)
    reports = shown.pop("reports")
    figure = image_grid_figure(reports[:len(shown["real"])], shown, "held-out reports: real image and each model's sample")
    figure.savefig(out_dir / "samples.png", dpi=110)
    plt.close(figure)
