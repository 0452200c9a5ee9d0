"""DDPO's pieces that are plain math: advantage normalisation and the clipped per-step loss."""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import torch


class PerPromptStatTracker:
    """Normalise rewards per report using that report's recent rewards (DDPO's stat tracking).

    Each report keeps its last `buffer_size` rewards; with fewer than `min_count` of them the
    batch's mean and std are used instead.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def advantages(self, reports: list[str], rewards: np.ndarray) -> np.ndarray:
        """(r − mean) / (std + 1e-6) per report, after adding this batch's rewards to the buffers."""
        rewards = np.asarray(rewards, dtype=np.float64)
        result = np.empty_like(rewards)
        for report in sorted(set(reports)):
            mask = np.array([r == report for r in reports])
            self.buffers[report].extend(rewards[mask])
            history = np.array(self.buffers[report]) if len(self.buffers[report]) >= self.min_count else rewards
            result[mask] = (rewards[mask] - history.mean()) / (history.std() + 1e-6)
        return result


def check_update_batch(rewards: np.ndarray, count: int, batch_version: int, learner_version: int,
                       max_staleness: int) -> np.ndarray:
    """The rewards as float64 [count], after refusing a wrong count or rollouts of a version out of bounds."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape != (count,):
        raise ValueError(f"{rewards.shape[0]} rewards for {count} rollouts")
    if not 0 <= learner_version - batch_version <= max_staleness:
        raise ValueError(f"rollouts of weight version {batch_version} given to the learner at version "
                         f"{learner_version} (orchestration.max_staleness = {max_staleness})")
    return rewards


def finite_rows(rewards: np.ndarray, log_probs: np.ndarray, max_fraction: float) -> np.ndarray:
    """Boolean [B]: the samples whose reward and recorded log-probs [B, T] are all finite (the others are dropped
    from the update). More than `max_fraction` of the batch non-finite: ValueError, before anything is trained."""
    keep = np.isfinite(rewards) & np.isfinite(log_probs).all(axis=1)
    bad = int((~keep).sum())
    if bad > max_fraction * len(keep):
        raise ValueError(f"{bad} of {len(keep)} samples have a non-finite reward or log-prob, more than "
                         f"learner.max_nonfinite_fraction = {max_fraction}; nothing was trained on this batch. "
                         "A reward model or the sampler diverged: check the reward models' weights, lower learner.lr")
    return keep


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """(r − mean) / (std + 1e-6) over the whole batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def ddpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              adv_clip_max: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate for one denoising step, all tensors [B].

    loss = mean( max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) ),  ρ = exp(log p_θ − log p_old),  A clipped to ±adv_clip_max.
    """
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {
            "approx_kl": float(0.5 * ((log_prob - old_log_prob) ** 2).mean()),
            "clipfrac": float(((ratio - 1).abs() > clip_range).float().mean()),
        }
    return loss, info
