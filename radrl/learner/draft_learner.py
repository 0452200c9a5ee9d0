"""The CXRL learner for reward backpropagation (DRaFT-K, Clark et al. 2023; AlignProp is the same idea).

The rollout workers sample whole DDIM chains as for DDPO, without gradients, and keep the normal draws of the
last K steps. The learner takes each chain's x at step T − K and replays the last K steps with gradients:

    x_{i+1} = μ_θ(x_i, t_i) + σ_i·z_i     (z_i the recorded draw; σ_i fixed by the schedule)
    x_0 → image → r(image)  (radrl.learner.draft: the rewards as differentiable functions)
    loss = −mean r + β·mean_i ‖ε_θ(x_i) − ε_anchor(x_i)‖²

With the weights the chains were sampled with, the replay reproduces the worker's x_0 (`draft/replay_error`
logs the largest difference in each update's first minibatch). Each replayed step runs under activation
checkpointing, so memory grows with K by one latent per step, not one UNet's activations. K = 1 is DRaFT-LV's
base case; gradients stop at x_{T−K} (truncated backpropagation). The optimizer, LoRA + ACE, checkpoints and
the all-or-nothing rollback on a non-finite gradient are DDPO's (`DDPOLearner`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from radrl.config import ExperimentConfig
from radrl.learner.ddpo_learner import DDPOLearner
from radrl.learner.draft import DifferentiableRewards
from radrl.rollout.ddim import ddim_step_mean_std
from radrl.rollout.sampler import DiffusionTrajectory, text_conditions


class DraftLearner(DDPOLearner):
    """DRaFT-K on the diffusion policy: backpropagate the rewards of the last K denoising steps into LoRA + ACE."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.rewards = DifferentiableRewards(cfg, self.device)

    def replay(self, batch: DiffusionTrajectory, chains: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last K steps of `chains` with gradients → (x_0 [b, C, H, W], anchor penalty [b])."""
        rollout, K = self.cfg.rollout, self.cfg.learner.draft_steps
        first = len(batch.timesteps) - K
        x = batch.latents[chains, first]
        penalty = torch.zeros(len(chains), device=x.device)
        for k in range(K):
            t, prev_t = batch.timesteps[first + k], batch.prev_timesteps[first + k]
            eps = checkpoint(self.policy.predict_noise, x, t, cond, uncond, rollout.guidance_scale,
                             use_reentrant=False)
            if self.cfg.learner.anchor_penalty > 0:
                with torch.no_grad(), self.policy.anchor():
                    eps_anchor = self.policy.predict_noise(x.detach(), t, cond, uncond, rollout.guidance_scale)
                penalty = penalty + ((eps - eps_anchor) ** 2).flatten(1).mean(dim=1) / K
            mean, std = ddim_step_mean_std(self.policy.models.scheduler, eps, t, prev_t, x, rollout.eta)
            x = mean + std * batch.noise[chains, k]
        return x, penalty

    def _update(self, batch: DiffusionTrajectory, rewards: np.ndarray) -> dict[str, float]:
        learner = self.cfg.learner
        if batch.noise is None or batch.noise.shape[1] != learner.draft_steps:
            raise ValueError(f"learner.algorithm=draft needs the normal draws of the last {learner.draft_steps} steps "
                             "in each trajectory; the rollout workers did not keep them (are they built from the same "
                             "config as the learner?)")
        self.policy.models.scheduler.set_timesteps(self.cfg.rollout.num_steps, device=self.device)
        stats: dict[str, list[float]] = {"loss": [], "reward": [], "anchor_penalty": [], "grad_norm": []}
        parts_seen: dict[str, list[float]] = {}
        replay_error = None
        for index in self.minibatches(len(batch.reports)):
            reports = [batch.reports[i] for i in index]
            cond, uncond = text_conditions(self.policy, reports)
            self.optimizer.zero_grad(set_to_none=True)
            micro = learner.micro_batch_size or len(index)
            totals = {"loss": 0.0, "reward": 0.0, "anchor_penalty": 0.0}
            for part in range(0, len(index), micro):
                rows = slice(part, part + micro)
                chains = index[rows].to(self.device)
                share = len(chains) / len(index)
                x0, penalty = self.replay(batch, chains, cond[rows], uncond[rows])
                if replay_error is None:  # the first micro-batch: the weights the chains were sampled with
                    replay_error = float((x0.detach() - batch.latents[chains, -1]).abs().max())
                reward, parts = self.rewards(self.policy.models.decode(x0), reports[rows])
                loss = (-reward + learner.anchor_penalty * penalty).mean()
                (loss * share).backward()
                totals["loss"] += float(loss.detach()) * share
                totals["reward"] += float(reward.detach().mean()) * share
                totals["anchor_penalty"] += float(penalty.detach().mean()) * share
                for name, value in parts.items():
                    parts_seen.setdefault(name, []).append(float(value.mean()))
            for key, value in totals.items():
                stats[key].append(value)
            stats["grad_norm"].append(self.optimizer_step("DRaFT"))
        self.version += 1
        metrics = {key: float(np.mean(values)) for key, values in stats.items()}
        metrics.update({f"reward_{name}": float(np.mean(values)) for name, values in parts_seen.items()})
        metrics.update(replay_error=replay_error, weight_version=self.version,
                       optimizer_steps=len(stats["grad_norm"]), trajectories=len(batch.reports))
        return metrics
