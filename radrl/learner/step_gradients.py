"""Which denoising steps dominate a DDPO update: the gradient norm of each step's loss term.

DDPO sums one policy-gradient term per denoising step, A·∇log p_θ(x_{t−1} | x_t). A step's score
scales like 1/σ_t, so the last, nearly noise-free steps (σ_t → 0) give the largest gradients,
although the noise they add barely changes the image and so carries little of the reward.
`step_gradient_norms` measures this on the config's own policy: advantages are drawn at random
(±1, zero mean per batch), which is the scale of each step's contribution to the update's noise.
`learner.min_train_timestep` leaves the steps below it out of the update.
"""

from __future__ import annotations

import numpy as np
import torch

from radrl.config import ExperimentConfig
from radrl.data.report_pool import iteration_reports, report_pool
from radrl.learner.ddpo import ddpo_loss
from radrl.learner.ddpo_learner import DDPOLearner, trained_steps
from radrl.rollout.ddim import step_std
from radrl.rollout.sampler import step_log_prob, text_conditions
from radrl.rollout.worker import RolloutWorker


def step_gradient_norms(cfg: ExperimentConfig, batches: int = 4) -> list[dict[str, float]]:
    """Per denoising step of the config's sampler: t, σ_t and the mean gradient norm (LoRA + ACE) of that step's
    DDPO loss term over `batches` sampled batches of training reports, and its share of the summed squared norms."""
    learner = DDPOLearner(cfg)
    worker = RolloutWorker(cfg)
    worker.load_weights(learner.publish())
    pool, rollout = report_pool(cfg.data, "train"), cfg.rollout
    generator = torch.Generator().manual_seed(cfg.seed)
    norms = []
    for batch in range(batches):
        reports = iteration_reports(pool, rollout.batch_size, cfg.seed, batch, rollout.samples_per_report)
        trajectory, _ = worker.sample(reports, seed=batch, with_anchor=False)
        trajectory = trajectory.to(learner.device)
        signs = torch.randint(0, 2, (len(reports),), generator=generator).float() * 2 - 1
        advantages = (signs - signs.mean()).to(learner.device)
        cond, uncond = text_conditions(learner.policy, reports)
        row = []
        for step in range(trajectory.timesteps.shape[0]):
            learner.optimizer.zero_grad(set_to_none=True)
            log_prob = step_log_prob(learner.policy, trajectory, step, cond, uncond, rollout.eta, rollout.guidance_scale)
            loss, _ = ddpo_loss(log_prob, trajectory.log_probs[:, step], advantages, cfg.learner.clip_range,
                                cfg.learner.adv_clip_max)
            loss.backward()
            row.append(float(torch.nn.utils.get_total_norm(
                [p.grad for p in learner.trainable_parameters() if p.grad is not None])))
        norms.append(row)
    mean = np.mean(norms, axis=0)
    sigma = step_std(learner.policy.models.scheduler, trajectory.timesteps.cpu(), trajectory.prev_timesteps.cpu(),
                     rollout.eta)
    share = mean ** 2 / (mean ** 2).sum()
    trained = set(trained_steps(trajectory.timesteps, cfg.learner.min_train_timestep).tolist())
    return [{"step": k, "t": int(t), "sigma": float(s), "grad_norm": float(g), "share": float(f),
             "trained": k in trained}
            for k, (t, s, g, f) in enumerate(zip(trajectory.timesteps.tolist(), sigma.tolist(), mean, share))]


def format_step_gradients(rows: list[dict[str, float]]) -> str:
    """Markdown: one line per denoising step."""
    lines = ["| step | t | σ_t | gradient norm | share of Σ norm² | trained (min_train_timestep) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['t']} | {r['sigma']:.4f} | {r['grad_norm']:.2e} | {100 * r['share']:.1f} % | "
              f"{'yes' if r['trained'] else 'no'} |" for r in rows]
    return "\n".join(lines)
