"""CXRL's rewards on hand-computed cases: r_align, diagnostic accuracy, CLIP consistency, RLCF."""

import math

import numpy as np
import pytest
import torch

from radrl.config import ModelsConfig, RewardsConfig
from radrl.data.phantom import Posture, render_phantom
from radrl.models.posture import r_align
from radrl.reward_actors.rewards import (ConsistencyReward, DiagnosisReward, PostureReward, diagnostic_accuracy,
                                         report_targets)
from radrl.reward_actors.rlcf import anchor_reference, combine, paired_variance_ratio

REPORTS = ["The heart is enlarged. Small left pleural effusion.", "No acute cardiopulmonary abnormality."]


def test_r_align_of_known_affines():
    psi = torch.tensor([
        [1.0, 1.0, 0.0, 0.0, 0.0],  # upright: perfect
        [1.2, 0.9, 0.3, 0.4, math.pi / 2],  # −(max(0.2, 0.1) + (π/2)/(2π) + 0.5)
        [0.7, 1.1, -0.6, 0.8, -math.pi],  # −(0.3 + 0.5 + 1.0)
    ])
    assert torch.allclose(r_align(psi), torch.tensor([0.0, -0.95, -1.8]), atol=1e-6)


def test_posture_reward_scores_upright_phantoms_above_tilted_ones():
    reward = PostureReward(ModelsConfig())
    upright = Posture(1.0, 1.0, 0.0, 0.0, 0.0)
    tilted = Posture(0.92, 0.92, 0.1, -0.05, 0.2)  # a typical mis-positioning of the training distribution
    truth = r_align(torch.from_numpy(np.stack([upright.as_array(), tilted.as_array()]))).numpy()
    images = torch.from_numpy(np.stack([render_phantom(frozenset(), p, size=32, seed=3) for p in (upright, tilted)]))
    scores, info = reward(images[:, None].float(), ["a", "b"])
    assert scores.shape == (2,) and info["posture"].shape == (2, 5)
    assert scores[0] > scores[1]
    assert np.allclose(scores, truth, atol=0.15)  # the shipped regressor's |Δr_align| is 0.035 on average


def test_report_targets_positive_negative_unmentioned_uncertain():
    names = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Pneumonia")
    targets = report_targets(
        ["Cardiomegaly. No pneumothorax. Possible pneumonia.", "No acute cardiopulmonary abnormality."], names)
    # positive → 1, negated → 0, not mentioned → 0, uncertain → NaN (not scored)
    assert np.array_equal(targets[0, :3], [1, 0, 0]) and np.isnan(targets[0, 3])
    assert np.array_equal(targets[1], [0, 0, 0, 0])


def test_diagnostic_accuracy_by_hand():
    probabilities = np.array([[0.9, 0.2, 0.6, 0.1], [0.4, 0.4, 0.4, 0.4]])
    targets = np.array([[1, 0, 0, np.nan], [np.nan, np.nan, np.nan, np.nan]])
    # image 0: classes 0 and 1 right, class 2 wrong, class 3 not scored → 2/3; image 1: nothing scored → 0
    assert np.allclose(diagnostic_accuracy(probabilities, targets), [2 / 3, 0.0])


def test_balanced_diagnostic_accuracy_by_hand():
    from radrl.reward_actors.rewards import diagnostic_balanced_accuracy

    probabilities = np.array([[0.9, 0.2, 0.6, 0.1, 0.3], [0.1, 0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1, 0.1]])
    targets = np.array([[1, 1, 0, 0, np.nan], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    # image 0: sensitivity 1/2, specificity 1/2 → 0.5 (accuracy 2/4); image 1 reads all negative: sensitivity 0,
    # specificity 1 → 0.5 (accuracy 0.8); image 2 has no positive: specificity 3/5 alone
    assert np.allclose(diagnostic_balanced_accuracy(probabilities, targets), [0.5, 0.5, 0.6])
    assert np.allclose(diagnostic_accuracy(probabilities, targets), [0.5, 0.8, 0.6])


def test_prevalence_weighted_diagnostic_score_by_hand():
    """One class in 1 of 4 training reports: a positive weighs 1/(2·¼) = 2, a negative 1/(2·¾) = ⅔; an image's score
    is the sum over its scored classes of weight × probability of its label, over the number of classes."""
    from radrl.reward_actors.rewards import diagnostic_prevalence_weighted, label_prevalence

    training = np.array([[1, 0], [0, 0], [0, 1], [0, np.nan]])
    prevalence = label_prevalence(training)  # class 0: 1/4; class 1: 1 of 3 scored
    assert np.allclose(prevalence, [0.25, 1 / 3])
    probabilities = np.array([[0.8, 0.3], [0.8, 0.3], [0.2, 0.6]])
    targets = np.array([[1, 0], [0, np.nan], [0, 1]])
    expected = [(2 * 0.8 + 0.75 * 0.7) / 2,  # positive 0.8 × 2, negative (1 − 0.3) × 1/(2·⅔)
                (2 / 3) * 0.2 / 2,  # negative (1 − 0.8) × ⅔, class 1 not scored
                ((2 / 3) * 0.8 + 1.5 * 0.6) / 2]
    assert np.allclose(diagnostic_prevalence_weighted(probabilities, targets, prevalence), expected)
    from radrl.reward_actors.rewards import prevalence_weighted_score  # the tensor form DRaFT differentiates

    assert np.allclose(prevalence_weighted_score(torch.tensor(probabilities), targets, prevalence).numpy(), expected)


def test_prevalence_weighted_score_does_not_pay_for_shifting_a_class_everywhere():
    """Over the training reports, lowering (or raising) one class's probability by the same amount on every image
    leaves the mean score as it was, where accuracy-like rewards pay for reading everything negative; separating
    positives from negatives raises it."""
    from radrl.config import DataConfig
    from radrl.data.report_pool import report_pool
    from radrl.reward_actors.rewards import diagnostic_prevalence_weighted, label_prevalence, report_targets

    pool = report_pool(DataConfig(), "train")
    reward = DiagnosisReward(ModelsConfig(), metric="prevalence_weighted", training_reports=pool)
    targets = report_targets(pool, reward.class_names)
    assert np.allclose(reward.prevalence, label_prevalence(targets))
    assert 0.02 < reward.prevalence[reward.class_names.index("Pleural Effusion")] < 0.08
    base = np.full(targets.shape, 0.5)
    for shift in (-0.3, 0.2):
        shifted = diagnostic_prevalence_weighted(base + shift, targets, reward.prevalence).mean()
        assert shifted == pytest.approx(diagnostic_prevalence_weighted(base, targets, reward.prevalence).mean(),
                                        abs=1e-9)
    assert diagnostic_accuracy(base - 0.3, targets).mean() > diagnostic_accuracy(base + 0.2, targets).mean()
    separated = np.where(targets == 1, 0.6, 0.4)
    assert (diagnostic_prevalence_weighted(separated, targets, reward.prevalence).mean()
            > diagnostic_prevalence_weighted(base, targets, reward.prevalence).mean() + 0.05)


def test_diagnosis_reward_prefers_the_images_that_show_the_reported_findings():
    """16 phantom seeds, each with and without the report's two findings. At the shipped operating points
    (Youden's J) the classifier decides the two reported classes right on nearly every image, and the images
    that show them score higher on average (single images can lose: the other 9 classes' false positives count)."""
    reward = DiagnosisReward(ModelsConfig())
    assert len(reward.class_names) == 11
    report = "Marked cardiomegaly. Large right pleural effusion."
    upright = Posture(1.0, 1.0, 0.0, 0.0, 0.0)
    reported = [reward.class_names.index("Cardiomegaly"), reward.class_names.index("Pleural Effusion")]
    sick_scores, healthy_scores, right = [], [], 0
    for seed in range(16):
        sick = render_phantom(frozenset({"Cardiomegaly", "Pleural Effusion"}), upright, size=32, seed=seed)
        healthy = render_phantom(frozenset(), upright, size=32, seed=seed)
        images = torch.from_numpy(np.stack([sick, healthy]))[:, None].float()
        scores, info = reward(images, [report, report])
        assert info["scored_classes"].tolist() == [11, 11]
        sick_scores.append(scores[0])
        healthy_scores.append(scores[1])
        decided = info["probabilities"][:, reported] >= 0.5
        right += int(decided[0].sum()) + int((~decided[1]).sum())
    assert right >= 0.9 * 64
    assert np.mean(sick_scores) > np.mean(healthy_scores) + 0.05


def _xrv_all_op_threshs():
    import torchxrayvision as xrv

    return torch.tensor(xrv.models.model_urls["densenet121-res224-all"]["op_threshs"], dtype=torch.float32)


def test_calibrated_probabilities_are_torchxrayvisions_own_forward_at_real_size():
    """A DenseNet-121 of real shape (random weights) with densenet121-res224-all's operating points: our
    probabilities equal xrv's forward, which applies sigmoid and op_norm itself."""
    import torchxrayvision as xrv

    from radrl.models.classifier import DENSENET121, DiagnosticClassifier

    torch.manual_seed(0)
    densenet = xrv.models.DenseNet(**DENSENET121).eval()
    classifier = DiagnosticClassifier(densenet, tuple(xrv.datasets.default_pathologies), 224, _xrv_all_op_threshs())
    images = torch.rand(2, 1, 224, 224)
    with torch.no_grad():
        ours = classifier.probabilities(images)
        densenet.op_threshs = _xrv_all_op_threshs()  # xrv's own path: forward → sigmoid → op_norm
        reference = densenet(images * 2048 - 1024)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_r_diag_decides_at_the_classifiers_operating_points(tmp_path):
    """p = 0.1 for every class: above densenet121-res224-all's operating point for 9 of the paper's 11 classes
    (Effusion's is 0.103, Lung Opacity's 0.202). A normal report (every class absent) is then right on 2 of 11
    classes; at a plain 0.5 it would be right on all 11, rewarding images with no findings."""
    import torchxrayvision as xrv

    from radrl.config import ClassifierConfig
    from radrl.models.classifier import DENSENET121, DiagnosticClassifier, save_operating_points
    from radrl.models.weights import save_state

    densenet = xrv.models.DenseNet(**DENSENET121)
    with torch.no_grad():
        densenet.classifier.weight.zero_()
        densenet.classifier.bias.fill_(math.log(0.1 / 0.9))
    path = tmp_path / "densenet121.safetensors"
    save_state(densenet, path)
    save_operating_points(DiagnosticClassifier(densenet, tuple(xrv.datasets.default_pathologies), 224),
                          _xrv_all_op_threshs().numpy(), path)
    reward = DiagnosisReward(ModelsConfig(classifier=ClassifierConfig(weights=str(path), arch="densenet121")))
    assert len(reward.class_names) == 11
    scores, _ = reward(torch.rand(1, 1, 64, 64), ["No acute cardiopulmonary abnormality."])
    assert scores[0] == pytest.approx(2 / 11)
    (tmp_path / "densenet121_op_threshs.json").unlink()  # without operating points: a plain 0.5, with a warning
    with pytest.warns(UserWarning, match="no operating points"):
        uncalibrated = DiagnosisReward(ModelsConfig(classifier=ClassifierConfig(weights=str(path), arch="densenet121")))
    assert uncalibrated(torch.rand(1, 1, 64, 64), ["No acute cardiopulmonary abnormality."])[0][0] == 1.0


def test_youden_operating_point_by_hand():
    from radrl.models.classifier import youden_operating_points

    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.2]])
    truth = np.array([[1], [1], [0], [1], [0]])
    # TPR − FPR predicting ≥ t present: 0.9: 1/3 − 0; 0.8: 2/3 − 0; 0.7: 2/3 − 1/2; 0.6: 1 − 1/2; 0.2: 1 − 1
    assert youden_operating_points(scores, truth)[0] == 0.8
    assert np.isnan(youden_operating_points(scores, np.zeros((5, 1)))[0])  # one outcome only: no operating point


def test_shipped_tiny_classifier_has_an_operating_point_for_every_class():
    from radrl.models.classifier import load_tiny_classifier
    from radrl.models.weights import embedded_path

    classifier = load_tiny_classifier(embedded_path("classifier.safetensors"))
    assert classifier.op_threshs is not None and classifier.calibrated_targets() == classifier.targets


def test_consistency_reward_is_the_cosine_of_the_clip_embeddings():
    reward = ConsistencyReward(ModelsConfig())
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    scores, _ = reward(images, REPORTS)
    with torch.no_grad():
        expected = (reward.model.encode_images(images) * reward.model.encode_reports(REPORTS)).sum(-1).numpy()
    assert np.allclose(scores, expected, atol=1e-6) and np.all(np.abs(scores) <= 1 + 1e-6)


def test_rewards_reject_bad_inputs_with_clear_errors():
    reward = ConsistencyReward(ModelsConfig())
    with pytest.raises(ValueError, match="2 images but 1 reports"):
        reward(torch.rand(2, 1, 32, 32), REPORTS[:1])
    with pytest.raises(ValueError, match="empty report"):
        reward(torch.rand(1, 1, 32, 32), ["  "])
    with pytest.raises(ValueError, match="NaN"):
        reward(torch.full((1, 1, 32, 32), float("nan")), REPORTS[:1])


def test_rlcf_subtracts_the_anchor_for_diag_and_consist_only():
    policy = {"align": np.array([-0.1, -0.3]), "diag": np.array([0.9, 0.5]), "consist": np.array([0.4, 0.2])}
    anchor = {"align": np.array([-0.5, -0.5]), "diag": np.array([0.8, 0.7]), "consist": np.array([0.1, 0.3])}
    total, parts = combine(policy, anchor, RewardsConfig())
    assert np.allclose(parts["align"], [-0.1, -0.3])  # never comparative
    assert np.allclose(parts["diag"], [0.1, -0.2]) and np.allclose(parts["consist"], [0.3, -0.1])
    assert np.allclose(total, [-0.1 + 10 * 0.1 + 10 * 0.3, -0.3 + 10 * -0.2 + 10 * -0.1])


def test_anchor_reference_paired_or_mean_of_the_reports_anchor_images():
    reports = ["a", "a", "a", "b", "b", "b"]
    anchor = {"consist": np.array([0.1, 0.3, 0.5, 0.2, 0.6, 0.7])}
    paired = anchor_reference(reports, anchor, None, "paired")
    assert np.allclose(paired["consist"], anchor["consist"])
    mean = anchor_reference(reports, anchor, None, "report_mean")
    assert np.allclose(mean["consist"], [0.3, 0.3, 0.3, 0.5, 0.5, 0.5])
    # one anchor image per report (rows 0 and 3): every sample of the report is compared with it
    few = anchor_reference(reports, {"consist": np.array([0.4, 0.9])}, [0, 3], "report_mean")
    assert np.allclose(few["consist"], [0.4, 0.4, 0.4, 0.9, 0.9, 0.9])
    _, parts = combine({"align": np.zeros(6), "diag": np.ones(6), "consist": np.ones(6)},
                       {"diag": np.full(6, 0.5), **few}, RewardsConfig())
    assert np.allclose(parts["consist"], [0.6, 0.6, 0.6, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="'paired' needs one anchor image per policy image"):
        anchor_reference(reports, {"consist": np.array([0.4, 0.9])}, [0, 3], "paired")
    with pytest.raises(ValueError, match="no anchor image for report 'b'"):
        anchor_reference(reports, {"consist": np.array([0.4])}, [0], "report_mean")


def test_direct_feedback_and_reward_switches():
    policy = {"align": np.array([-0.2]), "diag": np.array([0.9]), "consist": np.array([0.4])}
    total, parts = combine(policy, None, RewardsConfig(rlcf=False, lambda_consist=0.0))
    assert set(parts) == {"align", "diag"} and np.allclose(total, [-0.2 + 9.0])
    with pytest.raises(ValueError, match="no anchor"):
        combine(policy, None, RewardsConfig())


def test_paired_variance_ratio():
    rng = np.random.default_rng(0)
    shared = rng.normal(size=4000)
    assert paired_variance_ratio(shared, shared) == 0.0
    assert paired_variance_ratio(shared + 0.1 * rng.normal(size=4000), shared) < 0.02
    assert abs(paired_variance_ratio(rng.normal(size=4000), rng.normal(size=4000)) - 1) < 0.1
