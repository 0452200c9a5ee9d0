"""Reinforcement learning with comparative feedback (RLCF): CXRL's total reward from direct scores.

    r_align   = r_align(x)                                   (never comparative)
    r_diag    = accuracy(G(x)) − accuracy(G(x̂))             x̂: the anchor's image for the same report
    r_consist = cos(F_v(x), F_t(y)) − cos(F_v(x̂), F_t(y))
    r         = λ_align·r_align + λ_diag·r_diag + λ_consist·r_consist

Without RLCF ("w/o RLCF", direct feedback) each component is the policy image's score alone.
A λ of 0 switches a reward off (its actor is not even started).
"""

from __future__ import annotations

import numpy as np

from radrl.config import RewardsConfig

COMPONENTS = ("align", "diag", "consist")
COMPARATIVE = frozenset({"diag", "consist"})


def weights(cfg: RewardsConfig) -> dict[str, float]:
    """λ of every reward that is switched on, by name."""
    all_weights = {"align": cfg.lambda_align, "diag": cfg.lambda_diag, "consist": cfg.lambda_consist}
    return {name: w for name, w in all_weights.items() if w > 0}


def anchor_reference(reports: list[str], anchor: dict[str, np.ndarray], rows: list[int] | None,
                     mode: str) -> dict[str, np.ndarray]:
    """The anchor score x̂ that each policy image is compared with, [B] per reward.

    `anchor` holds the scores of the anchor images of `rows` (None: one image per row, in row order).
    paired:      row i's own anchor image (it shares row i's x_T).
    report_mean: the mean over the anchor images of row i's report: the anchor's expected score for
                 that report, with 1/M of one image's variance (M images), and the same for every
                 sample of the report.
    """
    if mode == "paired":
        if rows is not None and list(rows) != list(range(len(reports))):
            raise ValueError("rewards.anchor_reference = 'paired' needs one anchor image per policy image")
        return {name: np.asarray(values, dtype=np.float64) for name, values in anchor.items()}
    rows = range(len(reports)) if rows is None else rows
    images_of: dict[str, list[int]] = {}
    for k, row in enumerate(rows):
        images_of.setdefault(reports[row], []).append(k)
    if missing := [report for report in reports if report not in images_of]:
        raise ValueError(f"no anchor image for report {missing[0]!r}: every report needs at least one")
    return {name: np.array([np.mean(np.asarray(values, dtype=np.float64)[images_of[report]]) for report in reports])
            for name, values in anchor.items()}


def combine(policy: dict[str, np.ndarray], anchor: dict[str, np.ndarray] | None,
            cfg: RewardsConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Total reward [B] and each weighted-in component [B] from direct scores of policy (and anchor) images."""
    if cfg.rlcf and anchor is None:
        raise ValueError("rewards.rlcf is on but no anchor scores were given")
    components = {}
    for name in weights(cfg):
        score = np.asarray(policy[name], dtype=np.float64)
        if cfg.rlcf and name in COMPARATIVE:
            score = score - np.asarray(anchor[name], dtype=np.float64)
        components[name] = score
    total = sum(w * components[name] for name, w in weights(cfg).items())
    return total, components


def paired_variance_ratio(policy: np.ndarray, anchor: np.ndarray) -> float:
    """Var(policy − anchor) / (Var(policy) + Var(anchor)).

    The denominator is what Var(policy − anchor) would be if the two images came from
    independent noise; a ratio below 1 is the variance that sharing the noise removes.
    """
    independent = np.var(policy) + np.var(anchor)
    return float(np.var(policy - anchor) / independent) if independent > 0 else 1.0
