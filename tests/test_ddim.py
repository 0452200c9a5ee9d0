"""The DDIM step with log-probability: diffusers' update, the Gaussian log-density, and the
scheduler's own previous-timestep list."""

import math

import pytest
import torch

from radrl.models.diffusion import latent_scheduler, pixel_scheduler
from radrl.rollout.ddim import ddim_step_with_logprob, previous_timesteps


@pytest.mark.parametrize("make", [pixel_scheduler, latent_scheduler])
def test_step_matches_diffusers_for_the_same_noise(make):
    scheduler = make()
    scheduler.set_timesteps(20)
    x, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    for t, prev_t in zip(scheduler.timesteps, previous_timesteps(scheduler)):  # the last step too (ᾱ after it: final)
        ours, _ = ddim_step_with_logprob(scheduler, eps, t, prev_t, x, eta=1.0, generator=torch.Generator().manual_seed(1))
        theirs = scheduler.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5)


def _mean(scheduler, eps, t, prev_t, x):
    """μ from a zero-noise diffusers step (η = 1 only sets σ; the noise term is added separately)."""
    return scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample


def test_log_prob_is_the_gaussian_density_mean_over_dims():
    scheduler = pixel_scheduler()
    scheduler.set_timesteps(10)
    t, prev_t = scheduler.timesteps[3], previous_timesteps(scheduler)[3]
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    mean = _mean(scheduler, eps, t, prev_t, x)
    std = scheduler._get_variance(t, prev_t).sqrt()
    target = mean + 0.5 * std  # every element half a sigma off the mean
    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, prev_t, x, eta=1.0, prev_sample=target)
    expected = -0.125 - std.log() - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(log_prob, expected.expand(2), atol=1e-6)


def test_recomputed_log_prob_of_a_recorded_step_is_identical():
    scheduler = pixel_scheduler()
    scheduler.set_timesteps(10)
    t, prev_t = scheduler.timesteps[2], previous_timesteps(scheduler)[2]
    x, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    sample, recorded = ddim_step_with_logprob(scheduler, eps, t, prev_t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    _, again = ddim_step_with_logprob(scheduler, eps, t, prev_t, x, eta=1.0, prev_sample=sample)
    assert torch.allclose((again - recorded).exp(), torch.ones(4), atol=1e-6)


def test_previous_timesteps_come_from_the_scheduler_list():
    scheduler = pixel_scheduler()
    scheduler.register_to_config(timestep_spacing="trailing")  # where t − 1000 // steps is wrong
    scheduler.set_timesteps(7)
    prev = previous_timesteps(scheduler)
    assert prev[:-1].tolist() == scheduler.timesteps[1:].tolist() and prev[-1] == -1


def test_per_sample_timesteps_and_eta_zero_refused():
    scheduler = pixel_scheduler()
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[[1, 5]]
    prev_t = previous_timesteps(scheduler)[[1, 5]]
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    _, log_prob = ddim_step_with_logprob(scheduler, eps, t, prev_t, x, eta=1.0)
    assert log_prob.shape == (2,) and torch.isfinite(log_prob).all()
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(scheduler, eps, t, prev_t, x, eta=0.0)


def test_a_schedule_with_a_deterministic_last_step_is_refused():
    """set_alpha_to_one=True: ᾱ after the last step is 1, so σ = 0 there and log N(x; μ, 0) is undefined."""
    from diffusers import DDIMScheduler

    from radrl.rollout.ddim import check_log_probs_defined

    config = dict(latent_scheduler().config)
    scheduler = DDIMScheduler.from_config({**config, "set_alpha_to_one": True})
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"σ is 0 at timestep\(s\) \[1\].*set_alpha_to_one=False"):
        check_log_probs_defined(scheduler, eta=1.0)
    good = latent_scheduler()
    good.set_timesteps(10)
    check_log_probs_defined(good, eta=1.0)
