"""The reward actor's body: one reward model scoring the policy and anchor images of a rollout."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from radrl.config import ExperimentConfig
from radrl.reward_actors.rewards import build_reward
from radrl.rollout.worker import RolloutImages, device_for


@dataclass(frozen=True)
class ScoredRollout:
    """Direct scores of one rollout batch's images under one reward."""

    reward: str
    policy: np.ndarray  # [B]
    anchor: np.ndarray | None  # [A] for the rollout's anchor rows (all B by default), None without anchor images
    seconds: float
    # diag only: the classifier's calibrated outputs [B, C] / [A, C] and its class names (evaluation metrics)
    policy_probabilities: np.ndarray | None = None
    anchor_probabilities: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None


class RewardScorer:
    """Holds one frozen reward model; scores policy and anchor images in a single batched call."""

    def __init__(self, cfg: ExperimentConfig, name: str):
        self.name = name
        self.reward = build_reward(name, cfg.models, device_for(cfg.rewards.resources.num_gpus), cfg.rewards.diag_metric,
                                   cfg.data)

    def score(self, rollout: RolloutImages) -> ScoredRollout:
        """Scores of rollout.policy_images (and anchor_images) for rollout.reports."""
        start = time.perf_counter()
        images, reports = rollout.policy_images, list(rollout.reports)
        if rollout.anchor_images is not None:
            rows = range(len(reports)) if rollout.anchor_rows is None else rollout.anchor_rows
            images, reports = torch.cat([images, rollout.anchor_images]), reports + [reports[i] for i in rows]
        scores, info = self.finite_scores(images, reports, {"weight_version": rollout.weight_version})
        n = len(rollout.reports)
        anchor = scores[n:] if rollout.anchor_images is not None else None
        probabilities = info.get("probabilities")
        if probabilities is None:
            return ScoredRollout(self.name, scores[:n], anchor, time.perf_counter() - start)
        return ScoredRollout(self.name, scores[:n], anchor, time.perf_counter() - start, probabilities[:n],
                             probabilities[n:] if anchor is not None else None, self.reward.class_names)

    def score_images(self, images: torch.Tensor, reports: list[str]) -> np.ndarray:
        """Direct scores of any images of the reports (e.g. anchor images sampled ahead of training)."""
        return self.finite_scores(images, list(reports), None)[0] if len(reports) else np.zeros(0)

    def finite_scores(self, images: torch.Tensor, reports: list[str], context) -> tuple[np.ndarray, dict]:
        """The reward of each image; NaN (and NaN probabilities) where it cannot be scored: an image that holds NaN
        or inf (a diverged sampler), or an empty report. The learner drops those samples and counts them
        (learner.max_nonfinite_fraction) instead of the run stopping."""
        valid = (torch.isfinite(images).flatten(1).all(dim=1).cpu().numpy()
                 & np.array([bool(r.strip()) for r in reports], dtype=bool))
        if valid.all():
            return self.reward(images, reports, context)
        rows = np.flatnonzero(valid)
        scores = np.full(len(reports), np.nan)
        info: dict = {}
        if rows.size:
            scores[rows], info = self.reward(images[torch.as_tensor(rows)], [reports[i] for i in rows], context)
        if "probabilities" in info or self.name == "diag":
            probabilities = np.full((len(reports), len(self.reward.class_names)), np.nan)
            if rows.size:
                probabilities[rows] = info["probabilities"]
            info = {**info, "probabilities": probabilities}
        return scores, info
