"""The CXRL learner: owns LoRA + ACE and their optimizer, runs DDPO updates, publishes weights."""

from __future__ import annotations

import numpy as np
import torch

from radrl.config import ExperimentConfig
from radrl.learner.ddpo import PerPromptStatTracker, batch_advantages, check_update_batch, ddpo_loss, finite_rows
from radrl.learner.state import load_training_state, training_state
from radrl.models.diffusion_policy import PublishedWeights
from radrl.rollout.ddim import check_log_probs_defined
from radrl.rollout.sampler import DiffusionTrajectory, concat_trajectories, step_log_prob, text_conditions
from radrl.rollout.worker import build_policy, device_for


def sample_timesteps(eligible: torch.Tensor, count: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """[samples, count]: for each sample its own random `count` of the eligible step indices (as the DDPO
    reference draws one permutation per sample), so a minibatch's gradient covers more steps at once."""
    return torch.stack([eligible[torch.randperm(len(eligible), generator=generator)[:count]] for _ in range(samples)])


def trained_steps(timesteps: torch.Tensor, min_train_timestep: int) -> torch.Tensor:
    """Indices of the denoising steps DDPO trains on: those at t ≥ min_train_timestep."""
    eligible = torch.nonzero(timesteps.cpu() >= min_train_timestep).flatten()
    if len(eligible) == 0:
        raise ValueError(f"learner.min_train_timestep = {min_train_timestep} leaves no denoising step to train "
                         f"(timesteps {timesteps.tolist()}); lower it or raise rollout.num_steps")
    return eligible


class DDPOLearner:
    """DDPO on the diffusion policy: advantages from rewards, then clipped per-timestep updates."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.device = device_for(cfg.learner.resources.num_gpus)
        self.policy = build_policy(cfg, self.device)
        learner = cfg.learner
        if learner.gradient_checkpointing:  # recompute the UNet's activations in the backward pass: memory only
            self.policy.unet.enable_gradient_checkpointing()
        groups = [{"params": self.policy.lora_parameters(), "lr": learner.lr}]
        if self.policy.ace is not None:
            groups.append({"params": [self.policy.ace], "lr": learner.ace_lr or learner.lr})
        self.optimizer = torch.optim.AdamW(groups, betas=learner.adam_betas, weight_decay=learner.weight_decay,
                                           eps=learner.adam_eps)
        self.tracker = PerPromptStatTracker(learner.stat_buffer_size, learner.stat_min_count)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # minibatch and timestep order
        self.version = 0
        scheduler = self.policy.models.scheduler  # refuse a min_train_timestep that leaves nothing, before any run
        scheduler.set_timesteps(cfg.rollout.num_steps)
        check_log_probs_defined(scheduler, cfg.rollout.eta)
        trained_steps(scheduler.timesteps, learner.min_train_timestep)

    def publish(self) -> PublishedWeights:
        """This version's LoRA + ACE tensors as numpy: everything a rollout worker needs, nothing more."""
        return PublishedWeights(self.version, {name: t.cpu().numpy().copy()
                                               for name, t in self.policy.trainable_state().items()})

    def advantages(self, reports: tuple[str, ...], rewards: np.ndarray) -> torch.Tensor:
        """Normalised advantages [B]: per report (stat tracker) or over the batch."""
        if self.cfg.learner.per_prompt_stats:
            return torch.as_tensor(self.tracker.advantages(list(reports), rewards), dtype=torch.float32)
        return torch.as_tensor(batch_advantages(rewards), dtype=torch.float32)

    def update(self, rewards: np.ndarray, *trajectories: DiffusionTrajectory) -> dict[str, float]:
        """One DDPO round on this iteration's trajectories (rewards in the same order); bumps the version.

        For each inner epoch the batch is shuffled into minibatches of `learner.batch_size`; each
        minibatch trains on a random `timestep_fraction` of the denoising steps, accumulating the
        gradient over those steps before one clipped AdamW step. All or nothing: a non-finite gradient in
        any minibatch undoes the whole round (weights, optimizer, RNG, advantage statistics) before it raises,
        so a retry sees the learner exactly as it was.
        """
        batch = concat_trajectories(list(trajectories)).to(self.device)
        rewards = check_update_batch(rewards, len(batch.reports), batch.weight_version, self.version,
                                     self.cfg.orchestration.max_staleness)
        keep = finite_rows(rewards, batch.log_probs.cpu().numpy(), self.cfg.learner.max_nonfinite_fraction)
        dropped = int((~keep).sum())
        if dropped:
            batch, rewards = batch.select(torch.as_tensor(keep)), rewards[keep]
        snapshot = self.state()
        try:
            return {**self._update(batch, rewards), "dropped_nonfinite": dropped}
        except FloatingPointError:
            self.load_state(*snapshot)
            raise

    def _update(self, batch: DiffusionTrajectory, rewards: np.ndarray) -> dict[str, float]:
        advantages = self.advantages(batch.reports, rewards).to(self.device)
        learner, rollout = self.cfg.learner, self.cfg.rollout
        eligible = trained_steps(batch.timesteps, learner.min_train_timestep)
        steps_trained = max(1, int(len(eligible) * learner.timestep_fraction))
        stats: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
        for index in self.minibatches(len(batch.reports)):
            reports = [batch.reports[i] for i in index]
            cond, uncond = text_conditions(self.policy, reports)
            steps = sample_timesteps(eligible, steps_trained, len(index), self.generator)  # [b, steps]
            self.optimizer.zero_grad(set_to_none=True)
            micro = learner.micro_batch_size or len(index)
            for j in range(steps_trained):
                step = steps[:, j]  # each sample's own j-th step
                parts = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
                # micro-batches: the minibatch's mean loss, its gradient accumulated a few samples at a time
                # (memory only: the same update up to float summation order)
                for part in range(0, len(index), micro):
                    rows = slice(part, part + micro)  # of the minibatch
                    chains = index[rows]  # of the batch
                    share = len(chains) / len(index)
                    log_prob = step_log_prob(self.policy, batch, step[rows], cond[rows], uncond[rows],
                                             rollout.eta, rollout.guidance_scale, index=chains.to(self.device))
                    loss, info = ddpo_loss(log_prob, batch.log_probs[chains, step[rows]], advantages[chains],
                                           learner.clip_range, learner.adv_clip_max)
                    (loss * share / steps_trained).backward()  # accumulated over micro-batches and timesteps
                    parts["loss"] += float(loss.detach()) * share
                    parts["approx_kl"] += info["approx_kl"] * share
                    parts["clipfrac"] += info["clipfrac"] * share
                for key, value in parts.items():
                    stats[key].append(value)
            stats["grad_norm"].append(self.optimizer_step("DDPO"))
        self.version += 1
        metrics = {key: float(np.mean(values)) for key, values in stats.items()}
        metrics.update(advantage_abs=float(advantages.abs().mean()), weight_version=self.version,
                       advantages=advantages.cpu().numpy(),  # for the TensorBoard histogram
                       optimizer_steps=len(stats["grad_norm"]), trajectories=len(batch.reports))
        return metrics

    def minibatches(self, count: int):
        """Each inner epoch's shuffled minibatches of learner.batch_size row indices (of `count` rows)."""
        for _ in range(self.cfg.learner.inner_epochs):
            order = torch.randperm(count, generator=self.generator)
            for start in range(0, count, self.cfg.learner.batch_size):
                yield order[start:start + self.cfg.learner.batch_size]

    def optimizer_step(self, algorithm: str) -> float:
        """Clip the accumulated gradient and step; a non-finite norm raises (`update` then undoes the round)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.learner.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"{algorithm} gradient norm is {float(grad_norm)} at weight version "
                                     f"{self.version}; lower learner.lr (this update was undone whole: "
                                     "weights, optimizer and advantage statistics are as before it)")
        self.optimizer.step()
        return float(grad_norm)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """LoRA matrices and ACE tokens: the only tensors an update may change."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able) of everything a resumed run needs: weights, optimizer, RNG, stat buffers."""
        # Copies: the live tensors change in place with the next update.
        tensors, meta = training_state(self.optimizer, self.generator, self.tracker, self.version)
        tensors.update({f"policy/{name}": t.detach().cpu().clone() for name, t in self.policy.trainable_state().items()})
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what `state` returned."""
        self.policy.load_trainable_state({k.removeprefix("policy/"): v for k, v in tensors.items()
                                          if k.startswith("policy/")})
        self.version = load_training_state(self.optimizer, self.generator, self.tracker, tensors, meta, self.device)
