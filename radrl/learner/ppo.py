"""LM-RRG's CQRL pieces that are plain math: group advantages, the adaptive KL weight and the PPO loss.

The algorithm is critic-free PPO with a per-image baseline: each image's reports sampled in one iteration
form a group, a report's advantage is its reward minus a baseline from the same image (the other reports
of its group, or its greedy report: self-critical), and the clipped PPO surrogate and a KL penalty to the
frozen reference train the policy. The paper's PPO is not specified further; it has no value head here
(see the README).
"""

from __future__ import annotations

import numpy as np
import torch


def group_advantages(rewards: np.ndarray, groups, estimator: str, greedy_rewards: np.ndarray | None = None
                     ) -> np.ndarray:
    """One advantage per sampled report, from a baseline of the same image (its group); no std division.

    rloo:        A_i = r_i − mean_{j≠i} r_j      (leave-one-out baseline: unbiased, = k/(k−1) · (r_i − mean))
    group_mean:  A_i = r_i − mean_j r_j
    greedy:      A_i = r_i − r(greedy report of the image)  (self-critical sequence training, Rennie et al. 2017;
                 ReMax): a sample is pushed up only if it beats what greedy decoding, the evaluated report, writes.
                 greedy_rewards [B] holds each row's greedy reward.
    A group whose rewards are all equal (greedy: all equal to the greedy report's) gives every member 0: it carries
    no preference between reports.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    groups = np.asarray(groups)
    if estimator not in ("rloo", "group_mean", "greedy"):
        raise ValueError(f"advantage estimator must be 'rloo', 'group_mean' or 'greedy', got {estimator!r}")
    if estimator == "greedy":
        if greedy_rewards is None or len(greedy_rewards) != len(rewards):
            raise ValueError("the greedy baseline needs each sampled report's greedy reward (greedy_rewards [B])")
        return rewards - np.asarray(greedy_rewards, dtype=np.float64)
    result = np.empty_like(rewards)
    for group in np.unique(groups):
        members = groups == group
        k = int(members.sum())
        if k < 2:
            raise ValueError(f"group {group!r} has {k} sampled report; a group baseline needs 2 or more "
                             "(rollout.samples_per_report ≥ 2)")
        centred = rewards[members] - rewards[members].mean()
        result[members] = centred * k / (k - 1) if estimator == "rloo" else centred
    return result


def adaptive_lambda_kl(rewards: np.ndarray, theta: float) -> np.ndarray:
    """λ_KL per report: 1 if reward ≥ θ else reward / θ (LM-RRG), clipped below at 0.

    A report that already scores well stays close to the reference; a poor one may move further.
    The clip at 0 is ours: a negative weight would reward drifting from the reference.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    return np.where(rewards >= theta, 1.0, np.clip(rewards / theta, 0.0, 1.0))


def ppo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor,
             advantages: torch.Tensor, lambda_kl: torch.Tensor, clip_range: float,
             token_norm: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO with a per-sequence advantage and a KL penalty to the reference; token tensors [B, T], A and λ [B].

    ρ_t = exp(log π_θ − log π_old)
    policy term  = mean_b Σ_t max(−A_b ρ_t, −A_b clip(ρ_t, 1 ± ε)) / n_b
    KL term      = mean_b λ_b Σ_t k3_t / n_b,  k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1
                   (an unbiased, non-negative estimate of KL(π_θ ‖ π_ref) on tokens sampled from π)
    Every token of a report shares its report's advantage. n_b is the report's own token count
    (token_norm None: a mean per report, as GRPO) or one constant for all (token_norm = the longest
    report allowed, as Dr. GRPO). The per-report mean is length-biased: a long report with a negative
    advantage is pushed down less per token than a short one, which can let reports grow.
    """
    tokens = mask.sum(dim=1).clamp(min=1) if token_norm is None else torch.full_like(mask[:, 0], float(token_norm))
    ratio = torch.exp(log_probs - old_log_probs)
    advantages = advantages.unsqueeze(1)
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    policy_loss = ((surrogate * mask).sum(dim=1) / tokens).mean()
    log_ratio_ref = ref_log_probs - log_probs
    k3 = (torch.exp(log_ratio_ref) - log_ratio_ref - 1) * mask
    kl = k3.sum(dim=1) / tokens  # [B]
    loss = policy_loss + (lambda_kl * kl).mean()
    with torch.no_grad():
        info = {"policy_loss": float(policy_loss), "kl": float(kl.mean()),
                "clipfrac": float((((ratio - 1).abs() > clip_range).float() * mask).sum() / mask.sum().clamp(min=1)),
                "approx_kl": float((0.5 * (log_probs - old_log_probs) ** 2 * mask).sum() / mask.sum().clamp(min=1))}
    return loss, info
