"""CXRL's diagnostic metrics on generated images, policy against anchor: the paper's AUROC of the classifier
against the prompt's labels, and per class the sensitivity and specificity of its decisions, with paired
uncertainty (policy and anchor images share report and noise, so their differences are paired by image).

probabilities: the classifier's calibrated outputs (0.5 = each class's operating point), [N, C];
targets: the report labels, 1 / 0 / NaN (uncertain, not scored), [N, C].
"""

from __future__ import annotations

import numpy as np

from radrl.eval.image_metrics import per_class_auroc


def mean_auroc(probabilities: np.ndarray, targets: np.ndarray, names: tuple[str, ...]) -> float:
    """The mean over classes of per_class_auroc; NaN where no class has both outcomes."""
    try:
        return per_class_auroc(probabilities, targets, names)["mean"]
    except ValueError:  # no class with both outcomes in this resample
        return float("nan")


def _paired_rate_difference(policy: np.ndarray, anchor: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of policy − anchor over paired 0/1 outcomes."""
    difference = policy.astype(float) - anchor.astype(float)
    if len(difference) < 2:
        return float(difference.mean()) if len(difference) else float("nan"), float("nan")
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(len(difference)))


def diagnosis_summary(policy: np.ndarray, anchor: np.ndarray, targets: np.ndarray, names: tuple[str, ...],
                      resamples: int = 500, seed: int = 0) -> dict:
    """Mean AUROC of policy and anchor over the classes with both outcomes, the difference's paired bootstrap
    standard error (reports resampled, the same rows for both models), and per class: positives, negatives,
    AUROC, sensitivity and specificity at the operating point, each difference with its paired s.e."""
    summary: dict = {"mean_auroc": None, "per_class": {}}
    try:
        auroc_policy, auroc_anchor = per_class_auroc(policy, targets, names), per_class_auroc(anchor, targets, names)
    except ValueError:  # no class has both outcomes among these reports
        auroc_policy, auroc_anchor = {}, {}
    if auroc_policy:
        rng = np.random.default_rng(seed)
        differences = []
        for _ in range(resamples):
            rows = rng.integers(0, len(targets), len(targets))
            differences.append(mean_auroc(policy[rows], targets[rows], names)
                               - mean_auroc(anchor[rows], targets[rows], names))
        summary["mean_auroc"] = {"policy": auroc_policy["mean"], "anchor": auroc_anchor["mean"],
                                 "difference_se": float(np.nanstd(differences, ddof=1)),
                                 "classes": [n for n in names if n in auroc_policy]}
    for c, name in enumerate(names):
        positive, negative = targets[:, c] == 1, targets[:, c] == 0
        row = {"positives": int(positive.sum()), "negatives": int(negative.sum()),
               "auroc": {"policy": auroc_policy.get(name), "anchor": auroc_anchor.get(name)}}
        for metric, rows, present in (("sensitivity", positive, True), ("specificity", negative, False)):
            decided = [(p[rows, c] >= 0.5) == present for p in (policy, anchor)]
            mean, se = _paired_rate_difference(*decided)
            row[metric] = {"policy": float(decided[0].mean()) if rows.any() else None,
                           "anchor": float(decided[1].mean()) if rows.any() else None,
                           "difference": mean if rows.any() else None, "difference_se": se if rows.any() else None}
        summary["per_class"][name] = row
    return summary


def format_diagnosis_table(summary: dict) -> str:
    """Markdown: mean AUROC with its paired s.e., then sensitivity and specificity per class."""
    mean = summary["mean_auroc"]
    if mean is None:
        headline = "Classifier on the generated images: no class has both outcomes among these reports (no AUROC)"
    else:
        headline = (f"Classifier on the generated images against the prompt's labels (mean AUROC over "
                    f"{len(mean['classes'])} classes with both outcomes): anchor {mean['anchor']:.4f}, policy "
                    f"{mean['policy']:.4f}, difference {mean['policy'] - mean['anchor']:+.4f} ± "
                    f"{mean['difference_se']:.4f} (paired bootstrap s.e.)")
    lines = [headline, "",
             "| class (positives / negatives) | AUROC anchor → policy | sensitivity anchor → policy (Δ ± s.e.) "
             "| specificity anchor → policy (Δ ± s.e.) |", "|---|---|---|---|"]

    def rate(cell: dict) -> str:
        if cell["policy"] is None:
            return "–"
        se = "" if np.isnan(cell["difference_se"]) else f" ± {cell['difference_se']:.3f}"
        return f"{cell['anchor']:.3f} → {cell['policy']:.3f} ({cell['difference']:+.3f}{se})"

    for name, row in summary["per_class"].items():
        auroc = row["auroc"]
        shown = "–" if auroc["policy"] is None else f"{auroc['anchor']:.3f} → {auroc['policy']:.3f}"
        lines.append(f"| {name} ({row['positives']} / {row['negatives']}) | {shown} | {rate(row['sensitivity'])} "
                     f"| {rate(row['specificity'])} |")
    return "\n".join(lines)
