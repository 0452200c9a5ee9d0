"""One DDIM denoising step as a Gaussian policy, with the log-probability DDPO needs.

With η > 0 the DDIM update x_t → x_{t−1} samples from N(μ_θ(x_t, t), σ_t² I); DDPO's policy
gradient needs log p_θ(x_{t−1} | x_t, c), recomputed at training time for the recorded
x_{t−1}. Plain PyTorch on top of a diffusers DDIMScheduler's ᾱ table; no Ray.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor


def previous_timesteps(scheduler: DDIMScheduler) -> torch.Tensor:
    """t_{i+1} for each t_i of the scheduler's own list (−1 after the last step).

    Taken from the list rather than computed as t − 1000 // steps, which is only right for
    "leading" spacing (a known bug of the DDPO reference code).
    """
    timesteps = scheduler.timesteps
    return torch.cat([timesteps[1:], timesteps.new_tensor([-1])])


def _alpha_bar(scheduler: DDIMScheduler, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t, with ᾱ_{−1} = the scheduler's final ᾱ (1 with set_alpha_to_one, else ᾱ_0)."""
    table = scheduler.alphas_cumprod.to(t.device)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=table.dtype, device=t.device)
    return torch.where(t >= 0, table[t.clamp(min=0)], final)


def step_std(scheduler: DDIMScheduler, t: torch.Tensor, prev_t: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}): the std of the step's Gaussian (same shape as t)."""
    alpha_t, alpha_prev = _alpha_bar(scheduler, t), _alpha_bar(scheduler, prev_t)
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()


def check_log_probs_defined(scheduler: DDIMScheduler, eta: float) -> None:
    """Refuse a schedule (after set_timesteps) with a step of σ_t = 0: its log-prob is −log 0, a NaN in DDPO.
    It happens at the last step of a scheduler with set_alpha_to_one=True (ᾱ after it is 1)."""
    timesteps = scheduler.timesteps
    std = step_std(scheduler, timesteps, previous_timesteps(scheduler), eta)
    if (std <= 0).any():
        zero = [int(t) for t, s in zip(timesteps, std) if s <= 0]
        raise ValueError(
            f"the DDIM step's σ is 0 at timestep(s) {zero} (set_alpha_to_one={scheduler.config.set_alpha_to_one}): "
            "that step is deterministic and has no log-probability for DDPO. Load the scheduler with "
            "set_alpha_to_one=False (Stable Diffusion's scheduler_config.json has it so)")


def ddim_step_mean_std(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,  # [B, C, H, W] predicted noise (after guidance)
    t: torch.Tensor,  # [B] or [] current timestep
    prev_t: torch.Tensor,  # [B] or [] next timestep from previous_timesteps()
    x_t: torch.Tensor,  # [B, C, H, W]
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ) of the DDIM step's Gaussian x_{t−1} ~ N(μ, σ²): μ [B, C, H, W] (differentiable in ε), σ [B, 1, 1, 1]."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"the DDIM step handles epsilon prediction, not {scheduler.config.prediction_type!r}")
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    t, prev_t = t.expand(x_t.shape[0]), prev_t.expand(x_t.shape[0])
    alpha_t = _alpha_bar(scheduler, t).view(shape).to(x_t.dtype)
    alpha_prev = _alpha_bar(scheduler, prev_t).view(shape).to(x_t.dtype)

    # x̂_0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t, clipped to the data range when the scheduler clips
    x0 = (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    std = step_std(scheduler, t, prev_t, eta).view(shape).to(x_t.dtype)
    # μ = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ_t²)·ε
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps
    return mean, std


def step_noise(shape: tuple, generator, device, dtype) -> torch.Tensor:
    """The step's standard normal draw: one generator for the batch, or one per chain (a chain's noise then
    depends on its own seed only)."""
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    eps: torch.Tensor,  # [B, C, H, W] predicted noise (after guidance)
    t: torch.Tensor,  # [B] or [] current timestep
    prev_t: torch.Tensor,  # [B] or [] next timestep from previous_timesteps()
    x_t: torch.Tensor,  # [B, C, H, W]
    eta: float,
    prev_sample: torch.Tensor | None = None,  # [B, C, H, W] recorded x_{t−1}; None = sample one
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,  # [B, C, H, W] the standard normal draw to use (prev_sample None); None = draw
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x_{t−1}, log p(x_{t−1} | x_t)) with the log-prob averaged over non-batch dims → [B]."""
    if eta <= 0:
        raise ValueError("eta must be > 0: with eta = 0 the step is deterministic and its log-prob undefined")
    mean, std = ddim_step_mean_std(scheduler, eps, t, prev_t, x_t, eta)
    if prev_sample is None:
        if noise is None:
            noise = step_noise(x_t.shape, generator, x_t.device, x_t.dtype)
        prev_sample = mean + std * noise
    # log N(x_{t−1}; μ, σ²) per element, then the mean (not sum) over C, H, W: sums over
    # thousands of dimensions overflow the importance ratio.
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x_t.dim())))
