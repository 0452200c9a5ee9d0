"""CQRL's math: the adaptive λ_KL rule and the PPO loss with its KL term."""

import numpy as np
import pytest
import torch

from radrl.learner.ppo import adaptive_lambda_kl, ppo_loss


def test_adaptive_lambda_kl_rule():
    # λ = 1 at or above θ, reward/θ below it, never negative
    assert adaptive_lambda_kl(np.array([2.0, 1.0, 0.5, 0.0, -0.3]), theta=1.0) == pytest.approx([1, 1, 0.5, 0, 0])
    assert adaptive_lambda_kl(np.array([0.3]), theta=0.6) == pytest.approx([0.5])


def test_ppo_loss_on_policy_is_minus_the_advantage_and_kl_vanishes_at_the_reference():
    log_probs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -3.0])
    loss, info = ppo_loss(log_probs, log_probs, log_probs, mask, advantages, torch.ones(2), clip_range=0.2)
    assert float(loss) == pytest.approx(np.mean([-1.0, 3.0]))  # ratio 1 everywhere: mean_b(−A_b)
    assert info["kl"] == 0.0 and info["clipfrac"] == 0.0


def test_ppo_kl_term_hand_computed():
    # one token, log π_ref − log π = ln 2: k3 = 2 − ln 2 − 1
    log_probs, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.0 + np.log(2.0)]])
    loss, info = ppo_loss(log_probs, log_probs, ref, torch.ones(1, 1), torch.zeros(1), torch.tensor([0.5]), 0.2)
    assert info["kl"] == pytest.approx(1 - np.log(2.0))
    assert float(loss) == pytest.approx(0.5 * (1 - np.log(2.0)))


def test_ppo_ratio_is_clipped_for_positive_advantages():
    old = torch.zeros(1, 1)
    new = torch.log(torch.tensor([[1.5]]))  # ratio 1.5 > 1 + ε
    loss, info = ppo_loss(new, old, new, torch.ones(1, 1), torch.tensor([2.0]), torch.zeros(1), clip_range=0.2)
    assert float(loss) == pytest.approx(-2.0 * 1.2)
    assert info["clipfrac"] == 1.0


def test_learner_uses_the_fixed_lambda_when_adaptive_kl_is_off():
    from radrl.config import load_config
    from radrl.learner.ppo_learner import ReportLearner

    rewards = np.array([0.2, 3.0])
    adaptive = ReportLearner(load_config(None, ["task=rrg", "rollout.samples_per_report=2",
                                                "learner.kl_threshold=0.4"]))
    assert adaptive.lambda_kl(rewards) == pytest.approx([0.5, 1.0])
    fixed = ReportLearner(load_config(None, ["task=rrg", "rollout.samples_per_report=2", "learner.adaptive_kl=false",
                                            "learner.lambda_kl=0.3"]))
    assert fixed.lambda_kl(rewards) == pytest.approx([0.3, 0.3])


def test_token_norm_constant_removes_the_per_report_length_bias():
    """Two on-policy reports with advantage −1, of 1 and 4 tokens. GRPO's per-report mean gives each of the long
    report's tokens a quarter of the short one's gradient; a constant divisor (Dr. GRPO) gives every token the same."""
    log_probs = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advantages, zero_kl = torch.tensor([-1.0, -1.0]), torch.zeros(2)
    per_report, _ = ppo_loss(log_probs, log_probs.detach(), log_probs.detach(), mask, advantages, zero_kl, 0.2)
    (grad_mean,) = torch.autograd.grad(per_report, log_probs)
    constant, _ = ppo_loss(log_probs, log_probs.detach(), log_probs.detach(), mask, advantages, zero_kl, 0.2,
                           token_norm=8)
    (grad_constant,) = torch.autograd.grad(constant, log_probs)
    # ∂/∂log π of mean_b Σ_t (A_b ρ_t)/n_b with ρ = 1: A_b / (n_b · B)
    assert grad_mean[0, 0] == pytest.approx(0.5) and grad_mean[1, 0] == pytest.approx(0.125)
    assert grad_constant[0, 0] == pytest.approx(1 / 16) and grad_constant[1, 3] == pytest.approx(1 / 16)
    assert grad_constant[0, 1] == 0.0  # padding gets none
