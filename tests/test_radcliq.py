"""RadCliQ and the report metrics on cases with known answers."""

import numpy as np
import pytest

from radrl.eval.text_metrics import bleu4, clinical_efficacy, meteor, nlg_and_ce, rouge_l
from radrl.reward_actors.radcliq import (RADCLIQ_CONSTANTS, LocalBertScore, bleu2, graph_f1, label_agreement, radcliq,
                                         rule_graph, sentence_bleu4)

NORMAL = "Heart size is normal. No pleural effusion or pneumothorax. The lungs are clear."
ABNORMAL = "Moderate cardiomegaly. Small left pleural effusion with adjacent atelectasis."


@pytest.mark.parametrize("version, perfect, empty", [("v1", -1.4407, 2.4501), ("v0", -0.2421, 5.5162)])
def test_radcliq_of_a_perfect_and_an_empty_report_match_references(version, perfect, empty):
    values = radcliq(np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), version)
    assert values == pytest.approx([perfect, empty], abs=1e-4)


def test_radcliq_at_the_feature_means_is_the_intercept():
    for version, (mean, _, _, intercept) in RADCLIQ_CONSTANTS.items():
        assert radcliq(mean[None], version)[0] == pytest.approx(intercept, abs=1e-12)


def test_radcliq_hand_computed_single_feature_step():
    # v1, BERTScore one scale above its mean, the rest at their means: intercept + coef_bertscore
    mean, scale, coef, intercept = RADCLIQ_CONSTANTS["v1"]
    features = mean.copy()
    features[1] += scale[1]
    assert radcliq(features[None], "v1")[0] == pytest.approx(-0.3703000997 + 2.467e-10)


def test_radcliq_refuses_features_in_the_wrong_shape():
    with pytest.raises(ValueError, match="radgraph"):
        radcliq(np.ones((2, 3)), "v1")


def test_bleu2_hand_computed():
    # unigrams 3/4 match, bigrams 2/3, equal lengths: sqrt(3/4 · 2/3)
    assert bleu2("a b c d", "a b c e") == pytest.approx(np.sqrt(0.75 * 2 / 3))
    assert bleu2("x y", "a b c") == 0.0  # no unigram in common: 0 before any smoothing
    assert bleu2(NORMAL, NORMAL) == pytest.approx(1.0)


def test_bleu2_smooths_a_zero_bigram_precision_as_the_official_fast_bleu():
    # fast_bleu's default smoothing: a zero precision p_n becomes ε / (candidate n-grams), ε = 0.1.
    # "clear lungs" vs "lungs clear": p1 = 2/2, p2 = 0.1/1, no brevity penalty → sqrt(0.1)
    assert round(bleu2("clear lungs", "lungs clear"), 3) == 0.316
    # one token: p1 = 1/1, p2 = 0.1/1 (an empty bigram count counts as 1), brevity exp(1 − 2/1)
    assert bleu2("clear", "lungs clear") == pytest.approx(np.exp(-1.0) * np.sqrt(0.1))


def test_bleu_tokens_split_on_single_spaces_as_the_official_code():
    from radrl.reward_actors.radcliq import normalize_spaces, report_tokens

    assert report_tokens("Lungs  clear. No\neffusion") == ["lungs", "clear", ".", "no\neffusion"]
    assert normalize_spaces("Lungs   are  clear.") == "Lungs are clear."


def test_radgraph_f1_of_two_empty_sets_is_zero_as_the_official_scorer():
    assert graph_f1((set(), set()), (set(), set())) == 0.0
    # the same entities and no relation on either side: (1 + 0) / 2
    entities = {("effusion", "OBS-DP")}
    assert graph_f1((entities, set()), (entities, set())) == 0.5


def test_rule_graph_reads_negation_and_location():
    entities, relations = rule_graph("No pleural effusion. Small left pleural effusion.")
    assert ("effusion", "OBS-DA") in entities and ("effusion", "OBS-DP") in entities
    assert ("effusion", "OBS-DP", "located_at", "left") in relations
    assert graph_f1(rule_graph(ABNORMAL), rule_graph(ABNORMAL)) == 1.0
    assert graph_f1(rule_graph(NORMAL), rule_graph(ABNORMAL)) < 0.3


def test_label_agreement_is_the_share_of_observations_with_the_same_status():
    agreement = label_agreement([NORMAL, NORMAL], [NORMAL, ABNORMAL])
    assert agreement[0] == 1.0 and 0 < agreement[1] < 1
    assert agreement[1] * 14 == pytest.approx(round(agreement[1] * 14))
    # an empty generated report mentions nothing: it agrees only where the reference is silent too
    silent = label_agreement([""], [ABNORMAL])[0]
    assert 0 < silent < 1


def test_an_empty_generated_report_gets_a_score_not_an_error():
    assert clinical_efficacy([""], [ABNORMAL])["ce_recall"] == 0.0
    assert bleu2("", ABNORMAL) == 0.0 and graph_f1(rule_graph(""), rule_graph(ABNORMAL)) == 0.0


def test_local_bertscore_of_identical_reports_is_one_and_unrelated_ones_lower():
    from radrl.models.weights import embedded_path

    scorer = LocalBertScore(embedded_path("decoder"), layer=2, baseline_reports=[NORMAL, ABNORMAL, "Normal chest."])
    scores = scorer([NORMAL, NORMAL, ""], [NORMAL, ABNORMAL, NORMAL])
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] < 0.9 and scores[2] == 0.0


def test_nlg_metrics_of_identical_texts():
    reports = [NORMAL, ABNORMAL]
    assert bleu4(reports, reports) == pytest.approx(1.0)
    assert rouge_l(reports, reports) == pytest.approx(1.0)
    assert meteor(reports, reports) > 0.99  # METEOR's fragmentation penalty keeps it just below 1
    assert sentence_bleu4("no acute disease", NORMAL) == 0.0


def test_clinical_efficacy_of_perfect_and_wrong_reports():
    assert clinical_efficacy([ABNORMAL], [ABNORMAL]) == {"ce_precision": 1.0, "ce_recall": 1.0, "ce_f1": 1.0}
    wrong = clinical_efficacy(["Large right pneumothorax."], [ABNORMAL])
    assert wrong == {"ce_precision": 0.0, "ce_recall": 0.0, "ce_f1": 0.0}
    # two of the reference's positives found, nothing extra: precision 1, recall 2/3 (cardiomegaly, effusion, atelectasis)
    partial = clinical_efficacy(["Moderate cardiomegaly. Small left pleural effusion."], [ABNORMAL])
    assert partial["ce_precision"] == 1.0 and partial["ce_recall"] == pytest.approx(2 / 3)


def test_nlg_refuses_mismatched_lists():
    with pytest.raises(ValueError, match="one generated report per reference"):
        nlg_and_ce([NORMAL], [NORMAL, ABNORMAL])


def test_report_reward_actor_radcliq_and_bleu4_rewards():
    from radrl.config import load_config
    from radrl.reward_actors.report_scorer import ReportRewardScorer
    from radrl.rollout.report_worker import ReportRollout

    rollout = ReportRollout((ABNORMAL, NORMAL, ""), (ABNORMAL, ABNORMAL, ABNORMAL), 0, {})
    radcliq_actor = ReportRewardScorer(load_config(None, ["task=rrg", "rollout.samples_per_report=2"]), "radcliq")
    scored = radcliq_actor.score(rollout)
    # a perfect report earns RadCliQ(all features 0) − RadCliQ(perfect) = 2.4501 + 1.4407; an empty one
    # shares only the observations neither report mentions (the label-agreement feature)
    assert scored.rewards[0] == pytest.approx(2.4501 + 1.4407, abs=1e-3)
    agreement = label_agreement([""], [ABNORMAL])[0]
    expected = radcliq(np.zeros((1, 4)), "v1")[0] - radcliq(np.array([[0.0, 0.0, agreement, 0.0]]), "v1")[0]
    assert scored.rewards[2] == pytest.approx(expected)
    assert scored.rewards[0] > max(scored.rewards[1:])  # (a wrong report can score below an empty one)
    assert "rule" in radcliq_actor.backend_names()["radgraph"]
    bleu_cfg = load_config(None, ["task=rrg", "rollout.samples_per_report=2", "rewards.rrg_reward=bleu4"])
    bleu_actor = ReportRewardScorer(bleu_cfg, "bleu4")
    assert bleu_actor.score(rollout).rewards == pytest.approx([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="rrg_reward"):
        ReportRewardScorer(load_config(None, ["task=rrg", "rollout.samples_per_report=2"]), "bleu4")
