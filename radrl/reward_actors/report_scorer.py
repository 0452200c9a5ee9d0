"""The LM-RRG reward actor's body: RadCliQ (or BLEU-4, for the ablation) of generated reports."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from radrl.config import ExperimentConfig
from radrl.data.report_pool import report_pool
from radrl.reward_actors.radcliq import FEATURES, RadCliQScorer, radcliq, sentence_bleu4
from radrl.rollout.report_worker import ReportRollout
from radrl.rollout.worker import device_for


@dataclass(frozen=True)
class ScoredReports:
    """Rewards of one rollout batch, and the RadCliQ features behind them."""

    reward: str
    rewards: np.ndarray  # [B], higher is better
    scores: dict[str, np.ndarray]  # each RadCliQ feature, radcliq_v0, radcliq_v1: [B]
    seconds: float
    greedy_rewards: np.ndarray | None = None  # [B] the reward of each row's greedy report, when the rollout has them


class ReportRewardScorer:
    """Holds the RadCliQ feature backends; scores generated reports against their ground truth.

    Reward (rewards.rrg_reward):
      radcliq: RadCliQ(empty report) − RadCliQ(report), in the configured version. RadCliQ is
               lower-better, so this is −RadCliQ shifted to be 0 for a report that shares nothing
               with its reference (all features 0); the shift leaves advantages unchanged and puts
               rewards on the positive scale that the adaptive λ_KL's threshold θ expects.
      bleu4:   sentence BLEU-4 (the LM-RRG ablation).
    """

    def __init__(self, cfg: ExperimentConfig, name: str):
        if name != cfg.rewards.rrg_reward:
            raise ValueError(f"report reward {name!r} asked for, but rewards.rrg_reward is {cfg.rewards.rrg_reward!r}")
        self.cfg, self.name = cfg, name
        self.version = cfg.rewards.radcliq_version
        self.radcliq = RadCliQScorer(cfg.rewards, report_pool(cfg.data, "train"), device_for(cfg.rewards.resources.num_gpus))
        self.empty_radcliq = float(radcliq(np.zeros((1, len(FEATURES))), self.version)[0])

    def backend_names(self) -> dict[str, str]:
        """Which backend produced each RadCliQ feature (results carry these names)."""
        return dict(self.radcliq.names)

    def score(self, rollout: ReportRollout) -> ScoredReports:
        """Rewards of rollout.reports against rollout.references (a non-finite one is dropped from the update by
        the learner and counted)."""
        start = time.perf_counter()
        scores = self.radcliq.score(rollout.reports, rollout.references)
        rewards = self._rewards(scores, rollout.reports, rollout.references)
        greedy = None
        if rollout.greedy is not None:  # one score per distinct (greedy report, reference), given to its rows
            pairs = list(dict.fromkeys(zip(rollout.greedy, rollout.references)))
            scored = dict(zip(pairs, self.rewards([p[0] for p in pairs], [p[1] for p in pairs])))
            greedy = np.array([scored[pair] for pair in zip(rollout.greedy, rollout.references)])
        return ScoredReports(self.name, rewards, scores, time.perf_counter() - start, greedy)

    def rewards(self, candidates: list[str], references: list[str]) -> np.ndarray:
        """The training reward of each report (what CQRL's validation selection averages)."""
        scores = self.radcliq.score(candidates, references) if self.name == "radcliq" else {}
        return self._rewards(scores, candidates, references)

    def _rewards(self, scores: dict[str, np.ndarray], candidates: list[str], references: list[str]) -> np.ndarray:
        if self.name == "radcliq":
            return self.empty_radcliq - scores[f"radcliq_{self.version}"]
        return np.array([sentence_bleu4(c, r) for c, r in zip(candidates, references)])

    def evaluate(self, candidates: list[str], references: list[str]) -> dict[str, np.ndarray]:
        """Per report: every RadCliQ feature and RadCliQ v0 / v1."""
        return self.radcliq.score(candidates, references)
