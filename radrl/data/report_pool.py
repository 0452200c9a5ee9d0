"""The report texts a CXRL run conditions on: a training pool and a held-out pool."""

from __future__ import annotations

import numpy as np

from radrl.config import DataConfig


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


def iteration_reports(pool: list, count: int, seed: int, iteration: int, samples_per_report: int = 1) -> list:
    """The `count` reports (or any pool items) of one iteration, each of count / samples_per_report distinct ones
    repeated samples_per_report times in a row. A function of (seed, iteration) only, so a resumed
    run draws exactly what the uninterrupted run would have."""
    distinct = count // samples_per_report
    rng = np.random.default_rng([seed, iteration])
    chosen = rng.choice(len(pool), size=distinct, replace=distinct > len(pool))
    return [pool[i] for i in chosen for _ in range(samples_per_report)]
