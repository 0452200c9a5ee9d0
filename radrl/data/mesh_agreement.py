"""How well the rule labeler agrees with the IU reports' own MeSH annotation.

MeSH terms look like "Pleural Effusion/bilateral/small": a heading, then qualifiers.
Mapping choices (from the vocabulary actually in the archive):
- by heading: the table MESH_TO_CHEXPERT below. "normal" is the IU term for a report
  with no finding at all, so it stands for No Finding.
- by heading + qualifier, where a heading only sometimes means a CheXpert class:
  "Cardiac Shadow/enlarged" -> Cardiomegaly, "Costophrenic Angle/blunted" -> Pleural
  Effusion, "Thickening/pleura" -> Pleural Other, "Mediastinum/enlarged|prominent" ->
  Enlarged Cardiomediastinum, "Density/lung" -> Lung Opacity (other Density terms are
  bone or soft tissue), "Density/round" -> Lung Lesion (IU's term for "nodular density").
- left out on purpose: "Calcified Granuloma", "Granuloma", "Granulomatous Disease" and
  "Calcinosis" (healed disease; the labeler does not call them Lung Lesion), "Cicatrix"
  (scarring; not Lung Opacity), "Foreign Bodies" and "Spinal Fusion" (not support
  devices), "Lung/hypoinflation" (low volumes, not atelectasis).
The labeler counts as positive when it says POSITIVE or UNCERTAIN (MeSH indexes
hedged findings too, e.g. "likely atelectasis").
"""

from typing import Sequence

from radrl.data.iu_reports import IUReport
from radrl.data.labeler import label_report
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label

MESH_TO_CHEXPERT: dict[str, str] = {
    "normal": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax",
    "Hydropneumothorax": "Pneumothorax",
    "Hemopneumothorax": "Pneumothorax",
    "Pulmonary Atelectasis": "Atelectasis",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Pulmonary Edema": "Edema",
    "Pulmonary Congestion": "Edema",
    "Opacity": "Lung Opacity",
    "Airspace Disease": "Lung Opacity",
    "Infiltrate": "Lung Opacity",
    "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion",
    "Fractures, Bone": "Fracture",
    "Catheters, Indwelling": "Support Devices",
    "Implanted Medical Device": "Support Devices",
    "Tube, Inserted": "Support Devices",
    "Medical Device": "Support Devices",
    "Surgical Instruments": "Support Devices",  # IU's term for clips and sternotomy wires
    "Stents": "Support Devices",
}

# (heading, qualifier) -> class, for headings that only mean the class with that qualifier.
MESH_QUALIFIED_TO_CHEXPERT: dict[tuple[str, str], str] = {
    ("Cardiac Shadow", "enlarged"): "Cardiomegaly",
    ("Costophrenic Angle", "blunted"): "Pleural Effusion",
    ("Thickening", "pleura"): "Pleural Other",
    ("Mediastinum", "enlarged"): "Enlarged Cardiomediastinum",
    ("Mediastinum", "prominent"): "Enlarged Cardiomediastinum",
    ("Density", "lung"): "Lung Opacity",
    ("Density", "round"): "Lung Lesion",  # how IU indexes a "nodular density"
}

SHARED_CLASSES: tuple[str, ...] = tuple(
    obs for obs in CHEXPERT_OBSERVATIONS
    if obs in MESH_TO_CHEXPERT.values() or obs in MESH_QUALIFIED_TO_CHEXPERT.values()
)


def mesh_labels(report: IUReport) -> dict[str, bool]:
    """Which shared classes the report's MeSH terms mark present."""
    present = {obs: False for obs in SHARED_CLASSES}
    for term in report.mesh:
        heading, *qualifiers = [part.strip() for part in term.split("/")]
        if heading in MESH_TO_CHEXPERT:
            present[MESH_TO_CHEXPERT[heading]] = True
        for qualifier in qualifiers:
            obs = MESH_QUALIFIED_TO_CHEXPERT.get((heading, qualifier))
            if obs is not None:
                present[obs] = True
    # CheXpert's No Finding rule applied to MeSH: IU's "normal" is stricter (it excludes
    # granulomas, spine changes, ...), which CheXpert's 13 findings do not cover.
    findings = (obs for obs in SHARED_CLASSES if obs not in ("No Finding", "Support Devices"))
    present["No Finding"] = present["No Finding"] or not any(present[obs] for obs in findings)
    return present


def agreement_table(reports: Sequence[IUReport]) -> list[dict]:
    """Per shared class: confusion counts, precision, recall, F1 and Cohen's kappa."""
    mesh = [mesh_labels(r) for r in reports]
    labeler = [label_report(r.text) for r in reports]
    rows = []
    for obs in SHARED_CLASSES:
        truth = [m[obs] for m in mesh]
        # UNCERTAIN counts as positive: MeSH indexes hedged findings as present.
        pred = [lab[obs] in (Label.POSITIVE, Label.UNCERTAIN) for lab in labeler]
        rows.append({"observation": obs, **_scores(truth, pred)})
    return rows


def _scores(truth: Sequence[bool], pred: Sequence[bool]) -> dict:
    tp = sum(t and p for t, p in zip(truth, pred))
    fp = sum(p and not t for t, p in zip(truth, pred))
    fn = sum(t and not p for t, p in zip(truth, pred))
    tn = len(truth) - tp - fp - fn
    n = len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # kappa = (p_o - p_e) / (1 - p_e), p_e from the two raters' marginal rates.
    p_o = (tp + tn) / n
    p_e = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
    kappa = (p_o - p_e) / (1 - p_e) if p_e < 1 else 1.0
    return {
        "n_mesh_pos": tp + fn, "n_labeler_pos": tp + fp,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": precision, "recall": recall, "f1": f1, "cohen_kappa": kappa,
    }


def format_agreement_table(rows: Sequence[dict]) -> str:
    """Fixed-width text table: one row per class, then the macro average."""
    counts = ("n_mesh_pos", "n_labeler_pos", "tp", "fp", "fn", "tn")
    rates = ("precision", "recall", "f1", "cohen_kappa")
    header = f"{'observation':<27}" + "".join(f"{c:>14}" for c in counts) + "".join(f"{r:>12}" for r in rates)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['observation']:<27}" + "".join(f"{row[c]:>14d}" for c in counts)
            + "".join(f"{row[r]:>12.3f}" for r in rates)
        )
    macro = {r: sum(row[r] for row in rows) / len(rows) for r in rates}
    lines.append("-" * len(header))
    lines.append(f"{'macro average':<27}" + " " * 14 * len(counts) + "".join(f"{macro[r]:>12.3f}" for r in rates))
    return "\n".join(lines)
