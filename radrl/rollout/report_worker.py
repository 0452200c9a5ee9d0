"""LM-RRG rollout worker: samples reports from the policy with per-token log-probs, and the
frozen reference's log-probs of the same tokens (for the learner's KL term)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from radrl.config import ExperimentConfig
from radrl.models.diffusion_policy import PublishedWeights
from radrl.models.report_generator import build_report_policy
from radrl.rollout.worker import device_for


@dataclass(frozen=True)
class ReportTrajectory:
    """Sampled reports of one batch, as the learner needs them."""

    images: torch.Tensor  # [B, 1, H, W] (the learner recomputes the frozen visual prompts from them)
    tokens: torch.Tensor  # [B, T] generated ids, padding after the first EOS
    mask: torch.Tensor  # [B, T] 1 on report tokens and their EOS
    log_probs: torch.Tensor  # [B, T] log π_old(token), 0 where masked
    ref_log_probs: torch.Tensor  # [B, T] log π_ref(token), 0 where masked
    references: tuple[str, ...]  # ground-truth reports
    groups: tuple[int, ...]  # the image each report was sampled for (training-set index): the advantage group
    weight_version: int

    def select(self, keep: np.ndarray) -> ReportTrajectory:
        """The reports where the boolean mask `keep` is true."""
        rows = torch.as_tensor(np.flatnonzero(keep))
        return ReportTrajectory(self.images[rows], self.tokens[rows], self.mask[rows], self.log_probs[rows],
                                self.ref_log_probs[rows], tuple(self.references[i] for i in rows.tolist()),
                                tuple(self.groups[i] for i in rows.tolist()), self.weight_version)


@dataclass(frozen=True)
class ReportRollout:
    """What the reward actor and the driver see of one batch: texts only."""

    reports: tuple[str, ...]  # generated
    references: tuple[str, ...]  # ground truth
    weight_version: int
    seconds: dict[str, float]
    greedy: tuple[str, ...] | None = None  # each row's image's greedy report (learner.rrg_advantage 'greedy')


def concat_report_trajectories(parts: list[ReportTrajectory]) -> ReportTrajectory:
    """One trajectory of several batches (token axes padded to the longest)."""
    width = max(p.tokens.shape[1] for p in parts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))

    versions = {p.weight_version for p in parts}
    if len(versions) != 1:
        raise ValueError(f"report trajectories of several weight versions {sorted(versions)} in one update")
    return ReportTrajectory(torch.cat([p.images for p in parts]), torch.cat([pad(p.tokens) for p in parts]),
                            torch.cat([pad(p.mask) for p in parts]), torch.cat([pad(p.log_probs) for p in parts]),
                            torch.cat([pad(p.ref_log_probs) for p in parts]),
                            tuple(r for p in parts for r in p.references), tuple(g for p in parts for g in p.groups),
                            parts[0].weight_version)


class ReportRolloutWorker:
    """Holds the report policy (supervised model + RL LoRA); samples and decodes reports."""

    def __init__(self, cfg: ExperimentConfig, index: int = 0):
        self.cfg, self.index = cfg, index
        self.device = device_for(cfg.rollout.resources.num_gpus)
        self.policy = build_report_policy(cfg, self.device).eval()
        self.weight_version = -1

    def load_supervised(self, weights: PublishedWeights) -> str:
        """Install the supervised stage's result and start the RL stage (once per run)."""
        self.policy.start_rl(weights.tensors)
        return self.policy.stage

    def load_weights(self, weights: PublishedWeights) -> int:
        """Install one version of the RL LoRA; returns the version now held."""
        self.policy.load_rl_state(weights.tensors)
        self.weight_version = weights.version
        return weights.version

    def held_version(self) -> int:
        return self.weight_version

    def _images(self, images) -> torch.Tensor:
        return torch.tensor(np.asarray(images), dtype=torch.float32).to(self.device)  # a copy: object-store arrays are read-only

    @torch.no_grad()
    def sample(self, images, references: list[str], groups: list[int], seed: int
               ) -> tuple[ReportTrajectory, ReportRollout]:
        """One sampled report per image row, with the policy's and the reference's token log-probs; `groups`
        names each row's image (rows of one image share a group: the learner's advantage baseline)."""
        if self.weight_version < 0:
            raise RuntimeError(f"rollout worker {self.index}: no weights loaded; the driver must broadcast first")
        generator = self.policy.generator
        start = time.perf_counter()
        pixels = self._images(images)
        prompts = generator.frozen_prompts(pixels)
        temperature = self.cfg.rollout.report_temperature  # the tempered policy: sampled, scored and trained alike
        tokens, mask = generator.generate(prompts, greedy=False, generator_seed=seed, temperature=temperature)
        log_probs = generator.token_log_probs(prompts, tokens, mask, temperature=temperature)
        seconds = {"policy": time.perf_counter() - start}
        start = time.perf_counter()
        with self.policy.reference():
            ref_log_probs = generator.token_log_probs(prompts, tokens, mask, temperature=temperature)
        seconds["reference"] = time.perf_counter() - start
        texts = tuple(generator.decode(tokens, mask))
        greedy = None
        if self.cfg.learner.rrg_advantage == "greedy":  # the self-critical baseline: once per image, given to its rows
            start = time.perf_counter()
            first = {g: row for row, g in reversed(list(enumerate(groups)))}
            decoded = dict(zip(first, generator.decode(*generator.generate(
                prompts[list(first.values())], greedy=True))))
            greedy = tuple(decoded[g] for g in groups)
            seconds["greedy"] = time.perf_counter() - start
        trajectory = ReportTrajectory(pixels.cpu(), tokens.cpu(), mask.cpu(), log_probs.cpu(), ref_log_probs.cpu(),
                                      tuple(references), tuple(int(g) for g in groups), self.weight_version)
        return trajectory, ReportRollout(texts, tuple(references), self.weight_version, seconds, greedy)

    @torch.no_grad()
    def sampled_reports(self, images, seed: int) -> list[str]:
        """Reports of the current policy sampled at temperature 1 from a fixed seed (evaluation)."""
        generator = self.policy.generator
        prompts = generator.frozen_prompts(self._images(images))
        return generator.decode(*generator.generate(prompts, greedy=False, generator_seed=seed))

    @torch.no_grad()
    def greedy(self, images) -> list[str]:
        """Greedy-decoded reports of the current policy (evaluation)."""
        return self.policy.generator.greedy_reports(self._images(images))

    def disease_decisions(self, images) -> np.ndarray:
        """The disease head's decisions on images, bool [B, 14] (evaluation: the head apart from the decoder)."""
        return self.policy.generator.disease_decisions(self._images(images)).cpu().numpy()
