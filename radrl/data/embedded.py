"""The embedded world: each real IU report paired with phantoms of its labelled findings.

A report's findings are what the project's labeler calls POSITIVE among the observations the
renderer can draw; each report gets `postures_per_report` phantoms, each in its own random
posture, with seeds derived from the report id so every run sees the same images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from radrl.data.iu_reports import IUReport, iu_split
from radrl.data.labeler import label_reports
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label
from radrl.data.phantom import RENDERED_FINDINGS, Posture, render_phantom


@dataclass(frozen=True)
class PhantomSpec:
    """Everything needed to render one phantom, and its ground truth."""

    findings: frozenset[str]
    posture: Posture
    seed: int


@dataclass(frozen=True)
class EmbeddedPair:
    """One report with one of its phantoms' specs; `labels` is the labeler's int8 [14] vector."""

    report_id: str
    report: str
    labels: np.ndarray
    phantom: PhantomSpec


def stable_seed(*parts) -> int:
    """A 31-bit seed from strings/ints, stable across processes (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def findings_from_labels(labels: np.ndarray) -> frozenset[str]:
    """The renderable observations the labeler marked POSITIVE (uncertain ones are not drawn)."""
    return frozenset(
        name for name, value in zip(CHEXPERT_OBSERVATIONS, labels)
        if value == Label.POSITIVE and name in RENDERED_FINDINGS
    )


def embedded_pairs(split: str, postures_per_report: int = 4, posture_spread: float = 1.0,
                   reports: list[IUReport] | None = None) -> list[EmbeddedPair]:
    """All (report, phantom spec) pairs of an IU split, in report order."""
    reports = reports if reports is not None else iu_split(split)
    labels = label_reports([r.text for r in reports])
    pairs = []
    for report, vector in zip(reports, labels):
        findings = findings_from_labels(vector)
        for k in range(postures_per_report):
            seed = stable_seed(report.report_id, k)
            posture = Posture.sample(np.random.default_rng(seed), spread=posture_spread)
            pairs.append(EmbeddedPair(report.report_id, report.text, vector, PhantomSpec(findings, posture, seed)))
    return pairs


def random_specs(n: int, seed: int, finding_rate: float = 0.2, posture_spread: float = 1.0) -> list[PhantomSpec]:
    """Phantoms with independently drawn findings and postures, for training the reward models."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        present = frozenset(f for f in RENDERED_FINDINGS if rng.random() < finding_rate)
        specs.append(PhantomSpec(present, Posture.sample(rng, spread=posture_spread), seed * 1_000_003 + i))
    return specs


def _render(args) -> np.ndarray:
    spec, size = args
    return render_phantom(spec.findings, spec.posture, size=size, seed=spec.seed)


def render_specs(specs: list[PhantomSpec], size: int, processes: int = 2) -> np.ndarray:
    """Render many phantoms in parallel processes → float32 [N, 1, size, size] in [0, 1]."""
    jobs = [(spec, size) for spec in specs]
    if processes <= 1 or len(jobs) < 64:
        images = [_render(job) for job in jobs]
    else:
        pool = get_context("fork").Pool(processes)  # fork: no re-import of the caller's __main__ (numpy-only work)
        try:
            images = pool.map(_render, jobs, chunksize=64)
        finally:  # close + join lets the workers exit on their own; terminate() would SIGTERM them
            pool.close()
            pool.join()
    return np.stack(images)[:, None].astype(np.float32)
