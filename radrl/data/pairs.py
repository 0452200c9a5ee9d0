"""Image–report pairs for report generation (LM-RRG): images in memory, reports, labels.

Embedded world: each IU report with one phantom of its labelled findings (rendered once).
MIMIC-CXR / IU X-ray: the frontal images of the split, loaded and resized; unreadable files
are skipped with a count, never silently replaced.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from radrl.config import DataConfig
from radrl.data.labeler import label_reports

log = logging.getLogger("radrl")


@dataclass(frozen=True)
class ImageReportSet:
    """N pairs: images float32 [N, 1, S, S] in [0, 1], report texts, labeler codes int8 [N, 14]."""

    images: np.ndarray
    reports: tuple[str, ...]
    labels: np.ndarray
    skipped: int = 0  # pairs left out when read: unreadable (missing, corrupt) image or empty report

    def __len__(self) -> int:
        return len(self.reports)

    def take(self, index) -> ImageReportSet:
        index = np.asarray(index)
        return ImageReportSet(self.images[index], tuple(self.reports[i] for i in index), self.labels[index])


def image_report_pairs(cfg: DataConfig, split: str, limit: int | None = None) -> ImageReportSet:
    """The pairs of `split` ('train' or 'test'), at most `limit` of them (a seeded draw), empty reports dropped.

    IU data (embedded, iu_xray): a test pair whose report text (normalised) occurs in the train split is
    dropped, so held-out images come with report texts no training step has seen.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.source == "embedded":
        from radrl.data.embedded import embedded_pairs, render_specs
        from radrl.data.iu_reports import iu_split, unseen_reports

        reports = iu_split(split) if split == "train" else unseen_reports(iu_split(split))
        pairs = [p for p in embedded_pairs(split, postures_per_report=1, posture_spread=cfg.posture_spread,
                                           reports=reports) if p.report.strip()]
        pairs = [pairs[i] for i in _draw(len(pairs), limit)]
        images = render_specs([p.phantom for p in pairs], cfg.image_size)
        return ImageReportSet(images, tuple(p.report for p in pairs), np.stack([p.labels for p in pairs]))
    return _from_records(cfg, split, limit)


def validation_split(pairs: ImageReportSet, size: int, seed: int = 0) -> tuple[ImageReportSet, ImageReportSet | None]:
    """(training, validation): whole report texts (normalised) drawn in a seeded order until the validation pairs
    number at least `size`, so no validation text occurs in training (a normal text that recurs 40 times goes to
    one side with all its pairs). size 0 → (pairs, None). The trainer draws with seed 0: the same texts are held
    back for every training seed.
    """
    if size == 0:
        return pairs, None
    from radrl.data.iu_reports import normalized_text

    texts = [normalized_text(r) for r in pairs.reports]
    counts = Counter(texts)
    distinct = sorted(counts)
    chosen, total = set(), 0
    for k in np.random.default_rng(seed).permutation(len(distinct)):
        if total >= size:
            break
        chosen.add(distinct[k])
        total += counts[distinct[k]]
    held = np.array([t in chosen for t in texts])
    if held.all() or not held.any():
        raise ValueError(f"learner.supervised_validation={size}: the {len(pairs)} training pairs ({len(distinct)} "
                         "distinct texts) cannot be split into training and validation; lower it, or 0 to turn it off")
    training = pairs.take(np.flatnonzero(~held))
    return replace(training, skipped=pairs.skipped), pairs.take(np.flatnonzero(held))


def _draw(n: int, limit: int | None) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(0).permutation(n)[:limit].tolist())


def _from_records(cfg: DataConfig, split: str, limit: int | None) -> ImageReportSet:
    from radrl.data.image_datasets import load_grayscale, load_iu_images, load_mimic_cxr

    if cfg.source == "mimic_cxr":
        records = load_mimic_cxr(cfg.mimic_root, reports_root=cfg.mimic_reports_root, max_tokens=cfg.max_tokens,
                                 n_train=cfg.n_train if split == "train" else 0,
                                 n_test=cfg.n_test if split == "test" else 0)[split]
    else:
        from radrl.data.iu_reports import iu_split, load_iu_reports, unseen

        records = [r for r in load_iu_images(cfg.iu_image_dir, load_iu_reports()) if r.split == split]
        if split == "test":  # held-out means unseen: no test text the train split has (iu_xray reports: impressions)
            records = unseen(records, [r.impression for r in iu_split("train")], text=lambda r: r.report)
    records = [records[i] for i in _draw(len(records), limit)]
    images, reports, skipped = [], [], 0
    for record in records:
        if not record.report.strip():
            skipped += 1
            continue
        try:
            images.append(load_grayscale(record.image_path, cfg.image_size).numpy())
        except OSError as error:  # missing or corrupt file: counted and reported, the rest go on
            skipped += 1
            log.warning("skipping %s: %s", record.image_path, error)
            continue
        reports.append(record.report)
    if skipped:
        log.warning("%s %s: skipped %d of %d pairs (unreadable image or empty report)", cfg.source, split, skipped,
                    len(records))
    if not reports:
        raise ValueError(f"no usable {split} image–report pairs in data source {cfg.source!r}; check the data paths")
    return ImageReportSet(np.stack(images), tuple(reports), label_reports(reports), skipped)
