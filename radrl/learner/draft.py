"""CXRL's rewards as differentiable functions of the image, for reward backpropagation (DRaFT-K).

    r(x) = λ_align·r_align(ψ(x)) + λ_diag·s_diag(G(x), y) + λ_consist·cos(F_v(x), F_t(y))

r_align and the CLIP cosine are the paper's rewards, computed by the same frozen models the reward actors hold.
The diagnostic accuracy is a count of decisions (p ≥ 0.5) and has no gradient, so its place is taken by a
surrogate with the same labels and the same operating points:

    s_diag = mean over the report's scored classes of  y·log p + (1 − y)·log(1 − p)

with p the classifier's calibrated output (torchxrayvision's op_norm: 0.5 is each class's operating point) and
y ∈ {0, 1} from `report_targets` (positive → 1; negative or not mentioned → 0; uncertain → not scored). Raising
s_diag pushes every scored p across its operating point towards the report's label, which is what raises the
accuracy. With `rewards.diag_metric: balanced` the positive and negative classes are averaged separately, then
together, as the balanced accuracy does.

RLCF subtracts the anchor's score for the same report, a constant in θ: the comparative reward and the direct one
have the same gradient, so reward backpropagation uses the direct form. The reward actors still score every
image with the exact paper rewards (accuracy included) for the logs, RLCF and evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from radrl.config import ExperimentConfig
from radrl.models.posture import r_align
from radrl.reward_actors.rewards import build_reward, prevalence_weighted_score, report_targets
from radrl.reward_actors.rlcf import weights

EPS = 1e-6  # p is clamped to [EPS, 1 − EPS] before the log


def diagnostic_log_likelihood(probabilities: torch.Tensor, targets: np.ndarray, balanced: bool = False) -> torch.Tensor:
    """s_diag per image [B] from calibrated probabilities [B, C] and targets [B, C] (1, 0 or NaN = not scored).
    An image with no scored class gets 0 (no gradient), as r_diag gives it a constant."""
    targets = torch.as_tensor(targets, dtype=probabilities.dtype, device=probabilities.device)
    scored = ~torch.isnan(targets)
    positive = scored & (targets == 1)
    negative = scored & (targets == 0)
    p = probabilities.clamp(EPS, 1 - EPS)
    log_p, log_not_p = torch.where(positive, p.log(), 0.0), torch.where(negative, (1 - p).log(), 0.0)
    if not balanced:
        return (log_p + log_not_p).sum(dim=1) / scored.sum(dim=1).clamp(min=1)
    n_pos, n_neg = positive.sum(dim=1), negative.sum(dim=1)
    halves = torch.stack([log_p.sum(dim=1) / n_pos.clamp(min=1), log_not_p.sum(dim=1) / n_neg.clamp(min=1)])
    present = torch.stack([n_pos > 0, n_neg > 0]).to(p.dtype)
    return (halves * present).sum(dim=0) / present.sum(dim=0).clamp(min=1)


class DifferentiableRewards(nn.Module):
    """The λ-weighted reward of images [B, 1, H, W] in [0, 1] for their reports, with gradients to the images.

    Holds its own frozen copies of the switched-on reward models (built as the reward actors build theirs)."""

    def __init__(self, cfg: ExperimentConfig, device: str = "cpu"):
        super().__init__()
        self.lambdas = weights(cfg.rewards)
        self.diag_metric = cfg.rewards.diag_metric
        self.scorers = {name: build_reward(name, cfg.models, device, cfg.rewards.diag_metric, cfg.data)
                        for name in self.lambdas}
        for scorer in self.scorers.values():
            scorer.model.requires_grad_(False)
        # registered, so .to() and state_dict see them; they never train
        self.models = nn.ModuleDict({name: scorer.model for name, scorer in self.scorers.items()})

    def forward(self, images: torch.Tensor, reports: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [B] differentiable, {reward name: [B] detached})."""
        parts = {}
        if "align" in self.scorers:
            parts["align"] = r_align(self.models["align"](images))
        if "diag" in self.scorers:
            scorer = self.scorers["diag"]
            probabilities = self.models["diag"].probabilities(images)[:, scorer.columns]
            targets = report_targets(list(reports), scorer.class_names)
            if self.diag_metric == "prevalence_weighted":  # already differentiable in the probabilities
                parts["diag"] = prevalence_weighted_score(probabilities, targets, scorer.prevalence)
            else:
                parts["diag"] = diagnostic_log_likelihood(probabilities, targets, self.diag_metric == "balanced")
        if "consist" in self.scorers:
            clip = self.models["consist"]
            with torch.no_grad():  # the report's text features are fixed
                text = clip.encode_reports(list(reports))
            parts["consist"] = (clip.encode_images(images) * text).sum(dim=-1).float()
        total = sum(self.lambdas[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}
