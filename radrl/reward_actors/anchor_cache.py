"""The frozen anchor's direct scores by (report, x_T seed): computed once, reused for the rest of the run.

With rollout.noise_seeds_per_report = K, each sample's x_T is one of K fixed seeds of its report,
and the anchor's per-step noise is seeded from that seed too (RolloutWorker.anchor_images): the
anchor's image of a (report, seed) pair, and so its score under every (frozen) reward model, never
changes. Rows whose pair is cached need no anchor sampling and no anchor scoring.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from radrl.data.embedded import stable_seed


def pair_seed(report: str, j: int, seed: int) -> int:
    """x_T seed number j of a report in a run of `seed`."""
    return stable_seed("x_T", seed, report, j)


def iteration_noise_seeds(reports: list[str], per_report: int, seed: int, iteration: int) -> list[int]:
    """Each row's x_T seed: a report's samples in an iteration take consecutive seeds of its K, from a seeded offset."""
    taken: Counter = Counter()
    seeds = []
    for report in reports:
        j = (stable_seed("pair offset", seed, iteration, report) + taken[report]) % per_report
        taken[report] += 1
        seeds.append(pair_seed(report, j, seed))
    return seeds


class AnchorCache:
    """Direct anchor scores per reward, keyed by (report, x_T seed); counts hits and misses."""

    def __init__(self):
        self.scores: dict[tuple[str, int], dict[str, float]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.scores)

    def missing(self, reports: list[str], seeds: list[int]) -> list[int]:
        """Rows whose anchor must still be sampled and scored."""
        return [i for i, pair in enumerate(zip(reports, seeds)) if pair not in self.scores]

    def store(self, reports: list[str], seeds: list[int], scores: dict[str, np.ndarray]) -> None:
        for i, pair in enumerate(zip(reports, seeds)):
            self.scores[pair] = {name: float(values[i]) for name, values in scores.items()}

    def complete(self, reports: list[str], seeds: list[int], rows: list[int],
                 sampled: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Full-batch anchor scores: `sampled` ([len(rows)] per reward) for `rows`, the cache for the others."""
        self.store([reports[i] for i in rows], [seeds[i] for i in rows], sampled)
        self.misses += len(rows)
        self.hits += len(reports) - len(rows)
        names = list(sampled) or list(next(iter(self.scores.values())))
        return {name: np.array([self.scores[pair][name] for pair in zip(reports, seeds)]) for name in names}
