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
    anchor: np.ndarray | None  # [B], None when the rollout had no anchor images
    seconds: float


class RewardScorer:
    """Holds one frozen reward model; scores policy and anchor images in a single batched call."""

    def __init__(self, cfg: ExperimentConfig, name: str):
        self.name = name
        self.reward = build_reward(name, cfg.models, device_for(cfg.rewards.resources.num_gpus))

    def score(self, rollout: RolloutImages) -> ScoredRollout:
        """Scores of rollout.policy_images (and anchor_images) for rollout.reports."""
        start = time.perf_counter()
        images, reports = rollout.policy_images, list(rollout.reports)
        if rollout.anchor_images is not None:
            images, reports = torch.cat([images, rollout.anchor_images]), reports * 2
        scores, _ = self.reward(images, reports, {"weight_version": rollout.weight_version})
        n = len(rollout.reports)
        anchor = scores[n:] if rollout.anchor_images is not None else None
        return ScoredRollout(self.name, scores[:n], anchor, time.perf_counter() - start)
