"""DDPO math against hand-derived values."""

import numpy as np
import pytest
import torch

from radrl.learner.ddpo import PerPromptStatTracker, batch_advantages, ddpo_loss


def test_loss_at_ratio_one_is_minus_mean_advantage():
    log_prob = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    loss, info = ddpo_loss(log_prob, log_prob.detach(), torch.tensor([1.0, -2.0, 0.5]), clip_range=1e-4, adv_clip_max=5)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert info == {"approx_kl": 0.0, "clipfrac": 0.0}
    loss.backward()  # d/dlogp of −A·exp(logp − old) at ratio 1 is −A/B
    assert torch.allclose(log_prob.grad, torch.tensor([-1.0, 2.0, -0.5]) / 3)


def test_clipping_and_advantage_clipping_by_hand():
    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.5, 0.5]))  # ratios 1.5 and 0.5
    loss, info = ddpo_loss(new, old, torch.tensor([10.0, 1.0]), clip_range=0.2, adv_clip_max=5)
    # sample 1: A = 5 (clipped from 10): max(−5·1.5, −5·1.2) = −6; sample 2: A = 1: max(−0.5, −0.8) = −0.5
    assert loss.item() == pytest.approx((-6.0 - 0.5) / 2, abs=1e-6)
    assert info["clipfrac"] == 1.0
    assert info["approx_kl"] == pytest.approx(0.5 * (np.log(1.5) ** 2 + np.log(0.5) ** 2) / 2, rel=1e-5)


def test_batch_advantages_are_standardised():
    adv = batch_advantages(np.array([1.0, 2.0, 3.0]))
    assert adv.mean() == pytest.approx(0) and adv.std() == pytest.approx(1, abs=1e-5)


def test_per_prompt_tracker_uses_report_stats_once_enough_and_batch_stats_before():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    first = tracker.advantages(["a", "b"], np.array([1.0, 3.0]))  # one reward each: batch stats (mean 2, std 1)
    assert np.allclose(first, [-1.0, 1.0], atol=1e-5)
    second = tracker.advantages(["a", "a"], np.array([2.0, 3.0]))  # "a" history: 1, 2, 3 → mean 2, std √(2/3)
    assert np.allclose(second, [0.0, 1 / np.sqrt(2 / 3)], atol=1e-5)
    tracker.advantages(["a"] * 3, np.array([9.0, 9.0, 9.0]))  # buffer keeps only the last 4: 3, 9, 9, 9
    assert list(tracker.buffers["a"]) == [3.0, 9.0, 9.0, 9.0]
