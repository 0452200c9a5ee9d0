"""Which reports a CXRL run trains and evaluates on."""

import pytest

from radrl.config import ConfigError, DataConfig, load_config
from radrl.data.report_pool import iteration_reports, report_pool


def test_pools_are_non_empty_and_capped():
    train = report_pool(DataConfig(n_train=200), "train")
    test = report_pool(DataConfig(n_test=50), "test")
    assert len(train) == 200 and len(test) == 50
    assert all(text.strip() for text in train + test)


def test_no_cxrl_evaluation_text_occurs_in_training():
    """Identical IU texts recur across report ids (13 of the first 64 test texts did): the test pool keeps only
    texts whose case- and whitespace-folded form no training report has, checked against the whole train split."""
    from radrl.data.iu_reports import iu_split

    fold = lambda text: " ".join(text.lower().split())  # noqa: E731  (the definition, written out here)
    train = {fold(r.text) for r in iu_split("train")}
    test = report_pool(DataConfig(), "test")
    assert len(test) > 200 and not [t for t in test if fold(t) in train]
    cap = DataConfig().n_train  # the training pool a run draws from is a subset of the train split
    assert all(fold(t) in train for t in report_pool(DataConfig(), "train")[:cap])


def test_iteration_reports_depend_on_seed_and_iteration_only():
    pool = [f"report {i}" for i in range(100)]
    assert iteration_reports(pool, 8, seed=0, iteration=3) == iteration_reports(pool, 8, seed=0, iteration=3)
    assert iteration_reports(pool, 8, seed=0, iteration=3) != iteration_reports(pool, 8, seed=0, iteration=4)
    assert iteration_reports(pool, 8, seed=0, iteration=3) != iteration_reports(pool, 8, seed=1, iteration=3)


def test_weighted_draws_follow_repeat_factors():
    """rollout.repeat_factor_threshold: a report with a finding in 1 of 10 reports and t = 1 has LVIS factor
    sqrt(1 / 0.1) = 3.162 against 1 for the 9 normal ones, so it is drawn with probability 3.162 / 12.162."""
    from radrl.data.labeler import label_reports
    from radrl.data.report_pool import repeat_factors

    pool = ["Large right pleural effusion."] + [f"Normal chest {i}. No acute disease." for i in range(9)]
    factors = repeat_factors(label_reports(pool), threshold=1.0)
    assert factors == pytest.approx([10 ** 0.5] + [1.0] * 9)
    draws = [r for it in range(4000) for r in iteration_reports(pool, 1, seed=0, iteration=it, weights=factors)]
    assert draws.count(pool[0]) / len(draws) == pytest.approx(10 ** 0.5 / (10 ** 0.5 + 9), abs=0.02)
    uniform = [r for it in range(4000) for r in iteration_reports(pool, 1, seed=0, iteration=it)]
    assert uniform.count(pool[0]) / len(uniform) == pytest.approx(0.1, abs=0.02)
    assert (iteration_reports(pool, 4, 0, 7, 2, factors) == iteration_reports(pool, 4, 0, 7, 2, factors))


def test_groups_of_samples_per_report():
    reports = iteration_reports([f"report {i}" for i in range(100)], 8, seed=0, iteration=0, samples_per_report=4)
    assert len(reports) == 8 and len(set(reports)) == 2
    assert reports[:4] == [reports[0]] * 4 and reports[4:] == [reports[4]] * 4


def test_a_group_must_fit_in_one_batch():
    with pytest.raises(ConfigError, match="samples_per_report = 3 must divide rollout.batch_size = 8"):
        load_config(None, ["rollout.samples_per_report=3"])
