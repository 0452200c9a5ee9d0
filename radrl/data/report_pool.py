"""The report texts a CXRL run conditions on: a training pool and a held-out pool."""

from __future__ import annotations

import numpy as np

from radrl.config import DataConfig
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label


def report_pool(cfg: DataConfig, split: str) -> list[str]:
    """Report texts of `split` ('train' or 'test'): IU reports for the embedded world, MIMIC impressions else.

    At most data.n_train / data.n_test of them, drawn with a fixed seed, empty ones dropped. Held-out means
    unseen: a test text whose normalised form (case and whitespace folded) occurs among the training texts is
    dropped (IU splits by report id, yet identical normal texts recur across ids).
    """
    from radrl.data.iu_reports import unseen

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    limit = cfg.n_train if split == "train" else cfg.n_test
    if cfg.source == "mimic_cxr":
        from radrl.data.image_datasets import load_mimic_cxr

        records = load_mimic_cxr(cfg.mimic_root, reports_root=cfg.mimic_reports_root, max_tokens=cfg.max_tokens,
                                 n_train=cfg.n_train, n_test=cfg.n_test if split == "test" else 0)
        texts, train_texts = [r.report for r in records[split]], [r.report for r in records["train"]]
    else:
        from radrl.data.iu_reports import iu_split

        texts, train_texts = [r.text for r in iu_split(split)], [r.text for r in iu_split("train")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"no non-empty {split} reports in data source {cfg.source!r}; check the data paths")
    if split == "test":
        found = len(texts)
        texts = unseen(texts, train_texts)
        if not texts:
            raise ValueError(f"all {found} test reports of {cfg.source!r} also occur in its training reports (case "
                             "and whitespace folded), and held-out reports must be unseen: give a test split with "
                             "texts of its own")
    order = np.random.default_rng(0).permutation(len(texts))[:limit]
    return [texts[i] for i in sorted(order)]


def repeat_factors(labels: np.ndarray, threshold: float) -> np.ndarray:
    """LVIS's repeat factor per pair: max over its POSITIVE findings c (No Finding aside) of max(1, sqrt(t / f_c)),
    f_c the share of pairs with c positive; 1 for a pair with none."""
    positive = labels == Label.POSITIVE
    positive[:, CHEXPERT_OBSERVATIONS.index("No Finding")] = False
    share = positive.mean(axis=0)
    per_class = np.maximum(1.0, np.sqrt(threshold / np.maximum(share, 1e-12)))
    return np.where(positive, per_class, 1.0).max(axis=1)


def iteration_reports(pool: list, count: int, seed: int, iteration: int, samples_per_report: int = 1,
                      weights: np.ndarray | None = None) -> list:
    """The `count` reports (or any pool items) of one iteration, each of count / samples_per_report distinct ones
    repeated samples_per_report times in a row. Drawn uniformly, or in proportion to `weights` (one per pool
    item, e.g. repeat factors). A function of (seed, iteration) only, so a resumed run draws exactly what the
    uninterrupted run would have."""
    distinct = count // samples_per_report
    rng = np.random.default_rng([seed, iteration])
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    chosen = rng.choice(len(pool), size=distinct, replace=distinct > len(pool), p=p)
    return [pool[i] for i in chosen for _ in range(samples_per_report)]
