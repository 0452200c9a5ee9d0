"""The rollout worker: holds the policy (and, with adapters off, the anchor) and only generates."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from radrl.config import ExperimentConfig
from radrl.data.embedded import stable_seed
from radrl.models.diffusion import build_diffusion
from radrl.models.diffusion_policy import DiffusionPolicy, PublishedWeights
from radrl.rollout.sampler import DiffusionTrajectory, sample_trajectories


@dataclass(frozen=True)
class RolloutImages:
    """What the reward actors and the driver see of one rollout batch (small: no latents)."""

    reports: tuple[str, ...]
    policy_images: torch.Tensor  # [B, 1, H, W] in [0, 1]
    anchor_images: torch.Tensor | None  # [B, 1, H, W], None when the anchor was not sampled
    weight_version: int
    seconds: dict[str, float]  # wall time of the policy and the anchor sampling
    anchor_rows: tuple[int, ...] | None = None  # rows that anchor_images belong to; None = every row
    truncated: int = 0  # reports longer than the text encoder reads (cut to its first tokens)


def device_for(num_gpus: float) -> str:
    """'cuda' for an actor that was given (part of) a GPU, else 'cpu'."""
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def generators(seed: int | list[int], device: str) -> torch.Generator | list[torch.Generator]:
    """A seeded generator, or one per seed."""
    if isinstance(seed, int):
        return torch.Generator(device).manual_seed(seed)
    return [torch.Generator(device).manual_seed(s) for s in seed]


def build_policy(cfg: ExperimentConfig, device: str) -> DiffusionPolicy:
    """The generator of the config with LoRA + ACE added (seeded: every copy starts identical)."""
    torch.manual_seed(cfg.seed)
    models = build_diffusion(cfg.models.diffusion, cfg.data.image_size)
    learner = cfg.learner
    policy = DiffusionPolicy(models, learner.lora_rank, learner.lora_alpha, learner.lora_targets, learner.ace_tokens)
    speed = cfg.models.diffusion
    policy.accelerate(speed.precision, speed.channels_last, speed.compile)
    models.text_encoder.to(device)
    if models.vae is not None:
        models.vae.to(device)
    return policy.to(device).eval()


class RolloutWorker:
    """Samples DDIM trajectories of the current policy, and anchor images for the same reports."""

    def __init__(self, cfg: ExperimentConfig, index: int = 0):
        self.cfg, self.index = cfg, index
        self.device = device_for(cfg.rollout.resources.num_gpus)
        self.policy = build_policy(cfg, self.device)
        self.weight_version = -1  # nothing loaded yet: the learner's version 0 comes first
        # DRaFT's learner replays the policy chains' last K steps: keep their normal draws
        self.keep_noise = cfg.learner.draft_steps if cfg.learner.algorithm == "draft" else 0

    def load_weights(self, weights: PublishedWeights) -> int:
        """Install one version of the learner's LoRA + ACE tensors; returns the version now held."""
        self.policy.load_trainable_state(weights.tensors)
        self.weight_version = weights.version
        return weights.version

    def held_version(self) -> int:
        """The weight version this worker samples with (-1 before the first broadcast)."""
        return self.weight_version

    def generate(self, reports: list[str], noise_seed: int | list[int], step_seed: int | list[int],
                 rows: list[int] | None = None, keep_noise: int = 0) -> DiffusionTrajectory:
        """One DDIM trajectory per report from seeded x_T and per-step noise (the anchor's inside policy.anchor()).
        A seed is one for the batch or one per report (then a chain's noise depends on its own seed only).
        `rows`: run only those reports' chains, each from the x_T it gets in the whole batch; `keep_noise`: record the
        normal draws of the last that many steps."""
        if self.weight_version < 0:
            raise RuntimeError(f"rollout worker {self.index}: no weights loaded; the driver must broadcast first")
        rollout = self.cfg.rollout
        shape = (len(reports), *self.policy.models.latent_shape)
        initial_noise = randn_tensor(shape, generator=generators(noise_seed, "cpu"), device=torch.device("cpu"))
        if rows is not None:
            reports, initial_noise = [reports[i] for i in rows], initial_noise[rows]
        return sample_trajectories(self.policy, list(reports), rollout.num_steps, rollout.eta, rollout.guidance_scale,
                                   initial_noise.to(self.device), self.weight_version, generators(step_seed, self.device),
                                   keep_noise)

    def sample(self, reports: list[str], seed: int, with_anchor: bool, identical_noise: bool = False,
               row_seeds: list[int] | None = None, anchor_rows: list[int] | None = None
               ) -> tuple[DiffusionTrajectory, RolloutImages]:
        """One trajectory per report from the policy, plus the anchor's image of each report if asked.

        With `rollout.share_noise_with_anchor` the anchor starts from the policy's x_T (a paired
        comparison); its per-step noise is always its own. x_T is the chain's start state, not an
        action the policy takes, so an anchor score that depends on it is a valid baseline. Sharing
        the per-step noise too would make the anchor's score a function of the policy's actions:
        the comparative reward's gradient would then vanish at the anchor and be biased away from it.
        `identical_noise` does exactly that, for evaluation only (no gradient, lowest-variance pairing).

        `anchor_rows`: only those rows get an anchor image (each from its row's x_T when shared).

        `row_seeds` (rollout.noise_seeds_per_report): each report's x_T comes from its own seed, shared with
        the anchor, whose per-step noise is then seeded from it too: the anchor's image of a (report, seed)
        pair is always the same, so its scores can be cached and only `anchor_rows` need an anchor image.
        """
        start = time.perf_counter()
        trajectory = self.generate(reports, seed if row_seeds is None else row_seeds, seed + 1,
                                   keep_noise=self.keep_noise)
        seconds = {"policy": time.perf_counter() - start}
        anchor_images = None
        if with_anchor and row_seeds is not None:
            anchor_rows = list(range(len(reports))) if anchor_rows is None else anchor_rows
            start = time.perf_counter()
            anchor_images = self.anchor_images([reports[i] for i in anchor_rows], [row_seeds[i] for i in anchor_rows])
            seconds["anchor"] = time.perf_counter() - start
        elif with_anchor:  # the anchor for every row, or for `anchor_rows` (rollout.anchor_samples_per_report)
            start = time.perf_counter()
            with self.policy.anchor():
                shared_start = self.cfg.rollout.share_noise_with_anchor or identical_noise
                anchor_images = self.generate(reports, seed if shared_start else seed + 2,
                                              seed + 1 if identical_noise else seed + 3, rows=anchor_rows).images
            seconds["anchor"] = time.perf_counter() - start
        trajectory = trajectory.to("cpu")
        view = RolloutImages(tuple(reports), trajectory.images, None if anchor_images is None else anchor_images.cpu(),
                             self.weight_version, seconds, None if anchor_rows is None else tuple(anchor_rows),
                             self.policy.models.truncated(reports))
        return trajectory, view

    def anchor_images(self, reports: list[str], row_seeds: list[int]) -> torch.Tensor:
        """The anchor's image of each (report, x_T seed) pair: a function of the pair alone ([B, 1, H, W] on CPU)."""
        if not reports:
            return torch.empty(0, 1, self.cfg.data.image_size, self.cfg.data.image_size)
        with self.policy.anchor():
            steps = [stable_seed("anchor steps", s) for s in row_seeds]
            return self.generate(reports, row_seeds, steps).images.cpu()
