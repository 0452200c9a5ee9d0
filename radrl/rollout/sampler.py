"""Sampling diffusion trajectories with per-step log-probs (what a rollout worker returns)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from radrl.models.diffusion_policy import DiffusionPolicy
from radrl.rollout.ddim import check_log_probs_defined, ddim_step_with_logprob, previous_timesteps, step_noise


@dataclass(frozen=True)
class DiffusionTrajectory:
    """A batch of DDIM chains, one per report, and the weight version that produced them."""

    reports: tuple[str, ...]
    latents: torch.Tensor  # [B, T+1, C, H, W]: x_T, …, x_0
    timesteps: torch.Tensor  # [T] t of each step
    prev_timesteps: torch.Tensor  # [T] t−1 of each step, from the scheduler's list
    log_probs: torch.Tensor  # [B, T] log p(x_{t−1} | x_t, c), mean over C, H, W
    images: torch.Tensor  # [B, 1, H, W] in [0, 1]
    weight_version: int
    # [B, K, C, H, W] the standard normal draws of the last K steps (learner.algorithm draft: the learner replays
    # those steps with gradients from x at step T−K); None when not kept
    noise: torch.Tensor | None = None

    def select(self, rows) -> DiffusionTrajectory:
        """The chains of `rows` (indices or a boolean mask) only."""
        rows = torch.as_tensor(rows)
        rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
        return replace(self, reports=tuple(self.reports[int(i)] for i in rows),
                       latents=self.latents[rows.to(self.latents.device)],
                       log_probs=self.log_probs[rows.to(self.log_probs.device)],
                       images=self.images[rows.to(self.images.device)],
                       noise=None if self.noise is None else self.noise[rows.to(self.noise.device)])

    def to(self, device) -> DiffusionTrajectory:
        """The same trajectory with its tensors on `device`."""
        return replace(self, latents=self.latents.to(device), timesteps=self.timesteps.to(device),
                       prev_timesteps=self.prev_timesteps.to(device), log_probs=self.log_probs.to(device),
                       images=self.images.to(device), noise=None if self.noise is None else self.noise.to(device))


def concat_trajectories(trajectories: list[DiffusionTrajectory]) -> DiffusionTrajectory:
    """One batch from several sampled with the same steps and weight version."""
    first = trajectories[0]
    for other in trajectories[1:]:
        if other.weight_version != first.weight_version or not torch.equal(other.timesteps, first.timesteps):
            raise ValueError("cannot merge trajectories of different weight versions or timestep schedules")
    return replace(first, reports=sum((t.reports for t in trajectories), ()),
                   latents=torch.cat([t.latents for t in trajectories]),
                   log_probs=torch.cat([t.log_probs for t in trajectories]),
                   images=torch.cat([t.images for t in trajectories]),
                   noise=None if first.noise is None else torch.cat([t.noise for t in trajectories]))


def text_conditions(policy: DiffusionPolicy, reports: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_p of each report, c_p of the empty prompt), both [B, M, d], from the frozen text encoder."""
    cond = policy.models.encode_reports(reports)
    uncond = policy.models.encode_reports([""]).expand_as(cond)
    return cond, uncond


@torch.no_grad()
def sample_trajectories(policy: DiffusionPolicy, reports: list[str], num_steps: int, eta: float, guidance_scale: float,
                        initial_noise: torch.Tensor, weight_version: int, generator: torch.Generator,
                        keep_noise: int = 0) -> DiffusionTrajectory:
    """Run DDIM from `initial_noise` [B, C, H, W] and record every step (policy or, in policy.anchor(), the anchor);
    `keep_noise`: also record the normal draws of the last that many steps."""
    scheduler = policy.models.scheduler
    scheduler.set_timesteps(num_steps, device=initial_noise.device)
    check_log_probs_defined(scheduler, eta)
    timesteps, prev_timesteps = scheduler.timesteps, previous_timesteps(scheduler)
    cond, uncond = text_conditions(policy, reports)
    x, latents, log_probs, kept = initial_noise, [initial_noise], [], []
    for i, (t, prev_t) in enumerate(zip(timesteps, prev_timesteps)):
        eps = policy.predict_noise(x, t, cond, uncond, guidance_scale)
        noise = step_noise(x.shape, generator, x.device, x.dtype)
        if i >= len(timesteps) - keep_noise:
            kept.append(noise)
        x, log_prob = ddim_step_with_logprob(scheduler, eps, t, prev_t, x, eta, noise=noise)
        latents.append(x)
        log_probs.append(log_prob)
    return DiffusionTrajectory(
        reports=tuple(reports), latents=torch.stack(latents, dim=1), timesteps=timesteps.clone(),
        prev_timesteps=prev_timesteps, log_probs=torch.stack(log_probs, dim=1),
        images=policy.models.to_images(x), weight_version=weight_version,
        noise=torch.stack(kept, dim=1) if kept else None,
    )


def step_log_prob(policy: DiffusionPolicy, trajectory: DiffusionTrajectory, step: int | torch.Tensor,
                  cond: torch.Tensor, uncond: torch.Tensor, eta: float, guidance_scale: float,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """log p_θ of the recorded transition `step` (of the chains in `index`, default all) under the
    current weights, differentiable → [B]. `step`: one step index for every chain, or one per chain [B]."""
    latents = trajectory.latents if index is None else trajectory.latents[index]
    if isinstance(step, int) or step.dim() == 0:
        x_t, x_prev = latents[:, step], latents[:, step + 1]
    else:  # each chain its own step
        rows = torch.arange(len(latents), device=latents.device)
        step = step.to(latents.device)
        x_t, x_prev = latents[rows, step], latents[rows, step + 1]
    t, prev_t = trajectory.timesteps[step], trajectory.prev_timesteps[step]
    eps = policy.predict_noise(x_t, t, cond, uncond, guidance_scale)
    _, log_prob = ddim_step_with_logprob(policy.models.scheduler, eps, t, prev_t, x_t, eta, prev_sample=x_prev)
    return log_prob


@torch.no_grad()
def sample_images(policy: DiffusionPolicy, reports: list[str], num_steps: int, eta: float, guidance_scale: float,
                  initial_noise: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """Images [B, 1, H, W] in [0, 1] from `initial_noise`: the training sampler for η > 0; for η = 0 (deterministic
    DDIM, no log-probs) diffusers' own DDIMScheduler.step, as a diffusers pipeline denoises."""
    if eta > 0:
        return sample_trajectories(policy, reports, num_steps, eta, guidance_scale, initial_noise, 0, generator).images
    scheduler = policy.models.scheduler
    scheduler.set_timesteps(num_steps, device=initial_noise.device)
    cond, uncond = text_conditions(policy, reports)
    x = initial_noise
    for t in scheduler.timesteps:
        eps = policy.predict_noise(x, t, cond, uncond, guidance_scale)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return policy.models.to_images(x)
