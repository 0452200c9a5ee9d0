"""Report-generation metrics: NLG (BLEU-4, METEOR, ROUGE-L) and clinical efficacy (CE) via the labeler.

- BLEU-4: nltk's corpus BLEU (uniform 4-gram weights, no smoothing) over RadCliQ's tokens
  (lower case, '.' split off).
- METEOR: nltk's METEOR with exact and Porter-stem matching. WordNet synonym matching is off:
  nltk's WordNet data cannot be installed offline, so scores run slightly below METEOR 1.5's.
- ROUGE-L: the rouge-score package (F-measure, Porter stemming).
- CE precision / recall / F1: the project's labeler on generated and reference reports;
  an observation counts as present when labelled POSITIVE; example-based (per report, then
  averaged), and a report pair with no positives on either side scores 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer

from radrl.data.iu_reports import normalized_text
from radrl.data.labeler import label_reports
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label
from radrl.reward_actors.radcliq import bleu4, generated_labels, report_tokens


class _NoWordNet:
    """Stands in for nltk's WordNet reader: no synsets, so METEOR matches exact words and stems only."""

    @staticmethod
    def synsets(word, *args, **kwargs) -> list:
        return []


def meteor(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence METEOR (exact + stem matches)."""
    return float(np.mean([meteor_score([report_tokens(r)], report_tokens(c), wordnet=_NoWordNet())
                          for c, r in zip(candidates, references)]))


def rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(candidates, references)]))


def _positives(candidates: Sequence[str], references: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(generated, reference) POSITIVE labels, bool [N, 14]."""
    return generated_labels(candidates) == Label.POSITIVE, label_reports(list(references)) == Label.POSITIVE


def clinical_efficacy(candidates: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Example-based precision, recall and F1 of the 14 observations' POSITIVE labels."""
    predicted, truth = _positives(candidates, references)
    hits = (predicted & truth).sum(axis=1)
    n_pred, n_true = predicted.sum(axis=1), truth.sum(axis=1)
    both_empty = (n_pred == 0) & (n_true == 0)
    precision = np.where(both_empty, 1.0, hits / np.maximum(n_pred, 1))
    recall = np.where(both_empty, 1.0, hits / np.maximum(n_true, 1))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {"ce_precision": float(precision.mean()), "ce_recall": float(recall.mean()), "ce_f1": float(f1.mean())}


MACRO_MIN_POSITIVES = 5  # an observation counts in the macro F1 with at least this many positive references


def ce_macro_f1(candidates: Sequence[str], references: Sequence[str],
                min_positives: int = MACRO_MIN_POSITIVES) -> float:
    """The mean over observations of their F1 (POSITIVE labels), over the observations with at least
    `min_positives` positive references: each finding counts once, however common (example-based F1 is mostly
    the normal reports' No Finding). NaN when no observation has that many."""
    scores = ce_per_observation(candidates, references)
    kept = [s["f1"] for s in scores.values() if s["positives"] >= min_positives]
    return float(np.mean(kept)) if kept else float("nan")


def ce_per_observation(candidates: Sequence[str], references: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per observation, over the reports: F1, precision, recall of its POSITIVE label, and its reference count.

    An observation no reference and no candidate marks positive has no F1 (NaN): there is nothing to find.
    """
    return per_observation_scores(*_positives(candidates, references))


def per_observation_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """Per observation, F1 / precision / recall of `predicted` against `truth` (bool [N, 14]), and the positives
    (e.g. the disease head's decisions against the references' POSITIVE labels)."""
    result = {}
    for k, name in enumerate(CHEXPERT_OBSERVATIONS):
        hits = int((predicted[:, k] & truth[:, k]).sum())
        n_pred, n_true = int(predicted[:, k].sum()), int(truth[:, k].sum())
        precision = hits / n_pred if n_pred else float("nan") if not n_true else 0.0
        recall = hits / n_true if n_true else float("nan")
        f1 = 2 * hits / (n_pred + n_true) if n_pred + n_true else float("nan")
        result[name] = {"f1": f1, "precision": precision, "recall": recall, "positives": n_true}
    return result


def _column_f1(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per column (observation) of two bool [N, K] arrays, the F1 of `predicted` against `true`; NaN where neither
    has a positive."""
    hits, total = (predicted & true).sum(axis=0), predicted.sum(axis=0) + true.sum(axis=0)
    return np.where(total > 0, 2 * hits / np.maximum(total, 1), np.nan)


def ce_f1_changes(before: Sequence[str], after: Sequence[str], references: Sequence[str], resamples: int = 500,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """Per observation, F1(after) − F1(before) of two sets of reports for the same references, with the
    standard error of a paired bootstrap over reports (the same resampled rows for both): what "CE did not
    fall by more than noise" is judged against. NaN where no resample has a positive either side."""
    first, truth = _positives(before, references)
    second, _ = _positives(after, references)
    rng = np.random.default_rng(seed)
    changes = []
    for _ in range(resamples):
        rows = rng.integers(0, len(truth), len(truth))
        changes.append(_column_f1(second[rows], truth[rows]) - _column_f1(first[rows], truth[rows]))
    changes = np.array(changes)
    point = _column_f1(second, truth) - _column_f1(first, truth)
    with np.errstate(invalid="ignore"):
        spread = np.array([np.nanstd(column, ddof=1) if np.isfinite(column).sum() > 1 else np.nan
                           for column in changes.T])
    return {name: {"change": float(point[k]), "se": float(spread[k])} for k, name in enumerate(CHEXPERT_OBSERVATIONS)}


def ce_macro_f1_change(before: Sequence[str], after: Sequence[str], references: Sequence[str], resamples: int = 500,
                       seed: int = 0, min_positives: int = MACRO_MIN_POSITIVES) -> tuple[float, float]:
    """Macro CE F1 (ce_macro_f1) of `after` minus that of `before`, two sets of reports for the same references,
    and the standard error of a paired bootstrap over reports. The observations averaged are those with at least
    `min_positives` positive references in the whole set, in every resample."""
    first, truth = _positives(before, references)
    second, _ = _positives(after, references)
    kept = truth.sum(axis=0) >= min_positives
    if not kept.any():
        return float("nan"), float("nan")
    first, second, truth = first[:, kept], second[:, kept], truth[:, kept]

    def macro(predicted: np.ndarray, true: np.ndarray) -> float:
        return float(np.nanmean(_column_f1(predicted, true)))

    rng = np.random.default_rng(seed)
    changes = []
    for _ in range(resamples):
        rows = rng.integers(0, len(truth), len(truth))
        changes.append(macro(second[rows], truth[rows]) - macro(first[rows], truth[rows]))
    return macro(second, truth) - macro(first, truth), float(np.nanstd(changes, ddof=1))


def nlg_and_ce(candidates: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU-4, METEOR, ROUGE-L and CE precision / recall / F1 of generated reports."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"need one generated report per reference, got {len(candidates)} for {len(references)}")
    return {"bleu4": bleu4(candidates, references), "meteor": meteor(candidates, references),
            "rouge_l": rouge_l(candidates, references), **clinical_efficacy(candidates, references)}


# The always-"normal" baseline report: a text the labeler reads as No Finding and nothing else.
NORMAL_REPORT = ("The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax. "
                 "No acute disease.")


def ce_baselines(train_reports: Sequence[str], references: Sequence[str]) -> dict[str, dict]:
    """CE of two image-blind reports on `references`: the always-"normal" report and the training set's most common
    report text (case and whitespace folded). Each: its text, example-based CE, and CE per observation."""
    folded = Counter(normalized_text(r) for r in train_reports)
    common = folded.most_common(1)[0][0]
    result = {}
    for name, text in (("always_normal", NORMAL_REPORT), ("most_common_train", common)):
        same = [text] * len(references)
        result[name] = {"text": text, **clinical_efficacy(same, references),
                        "ce_per_observation": ce_per_observation(same, references)}
    return result
