"""CXRL's diagnostic evaluation metrics on hand-computed cases."""

import numpy as np
import pytest

from radrl.eval.diagnosis import diagnosis_summary, format_diagnosis_table


def test_auroc_sensitivity_and_specificity_by_hand():
    targets = np.array([[1.0], [1.0], [0.0], [0.0]])
    policy = np.array([[0.9], [0.8], [0.2], [0.1]])  # both positives above both negatives: AUROC 1
    anchor = np.array([[0.6], [0.3], [0.7], [0.1]])  # 2 of the 4 (positive, negative) pairs ordered: AUROC 0.5
    summary = diagnosis_summary(policy, anchor, targets, ("Effusion",), resamples=50)
    assert summary["mean_auroc"]["policy"] == 1.0 and summary["mean_auroc"]["anchor"] == 0.5
    assert summary["mean_auroc"]["difference_se"] > 0
    row = summary["per_class"]["Effusion"]
    assert (row["positives"], row["negatives"]) == (2, 2)
    # sensitivity: policy 2/2, anchor 1/2 (0.6 ≥ 0.5, 0.3 not); paired differences (0, 1): mean 0.5, s.e. 0.5
    assert row["sensitivity"]["policy"] == 1.0 and row["sensitivity"]["anchor"] == 0.5
    assert row["sensitivity"]["difference"] == 0.5 and row["sensitivity"]["difference_se"] == pytest.approx(0.5)
    assert row["specificity"]["policy"] == 1.0 and row["specificity"]["anchor"] == 0.5  # 0.7 reads present
    assert "Effusion (2 / 2)" in format_diagnosis_table(summary)


def test_uncertain_labels_are_left_out_and_a_class_without_positives_has_no_auroc():
    targets = np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, 0.0]])
    probabilities = np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.2]])
    summary = diagnosis_summary(probabilities, probabilities, targets, ("A", "B"), resamples=10)
    assert summary["mean_auroc"]["classes"] == ["A"]  # B has no positive
    assert summary["per_class"]["A"]["negatives"] == 1  # the uncertain row counts for neither
    assert summary["per_class"]["B"]["sensitivity"]["policy"] is None
    assert summary["per_class"]["B"]["specificity"]["policy"] == pytest.approx(2 / 3)
    nothing = diagnosis_summary(probabilities[:, 1:], probabilities[:, 1:], targets[:, 1:], ("B",))
    assert nothing["mean_auroc"] is None and "no AUROC" in format_diagnosis_table(nothing)


def test_evaluation_reports_give_every_class_in_the_pool_positives():
    from radrl.config import DataConfig
    from radrl.data.report_pool import report_pool
    from radrl.models.classifier import PAPER_CLASSES, chexpert_names
    from radrl.orchestration.driver import evaluation_reports
    from radrl.reward_actors.rewards import report_targets

    names = chexpert_names(PAPER_CLASSES)
    pool = report_pool(DataConfig(), "test")
    chosen = evaluation_reports(pool, 64)
    assert len(chosen) == 64 and all(t in pool for t in chosen)
    in_pool = np.nansum(report_targets(pool, names) == 1, axis=0)
    in_chosen = np.nansum(report_targets(chosen, names) == 1, axis=0)
    assert (in_chosen >= np.minimum(in_pool, 3)).all()
    assert (np.nansum(report_targets(pool[:64], names) == 1, axis=0) < np.minimum(in_pool, 3)).any()  # the plain cut
