"""The rule labeler on hand-written sentences, and its agreement with IU MeSH terms."""

import importlib.util

import numpy as np
import pytest

from radrl.data.labeler import label_report, label_reports, label_vector
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label

P, N, U, M = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN, Label.NOT_MENTIONED

# (text, {observation: expected label}); sentences written for this test.
CASES = [
    # plain positives
    ("Marked cardiomegaly.", {"Cardiomegaly": P}),
    ("The heart is moderately enlarged.", {"Cardiomegaly": P}),
    ("Small bilateral pleural effusions.", {"Pleural Effusion": P}),
    ("Blunting of the left costophrenic angle.", {"Pleural Effusion": P}),
    ("Large right pneumothorax.", {"Pneumothorax": P}),
    ("Patchy opacity in the right lower lobe.", {"Lung Opacity": P}),
    ("Dense consolidation of the lingula.", {"Consolidation": P}),
    ("Mild interstitial edema.", {"Edema": P}),
    ("Subsegmental atelectasis at the left base.", {"Atelectasis": P}),
    ("A 2 cm nodule in the right upper lobe.", {"Lung Lesion": P}),
    ("Healed fracture of the left sixth rib.", {"Fracture": P}),
    ("Left chest wall pacemaker with leads in the right ventricle.", {"Support Devices": P}),
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": P}),
    ("Right apical pleural thickening.", {"Pleural Other": P}),
    # negation, including lists and normal statements
    ("No pneumothorax.", {"Pneumothorax": N}),
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": N, "Pneumothorax": N}),
    (
        "No focal consolidation, pleural effusion, or pneumothorax.",
        {"Consolidation": N, "Pleural Effusion": N, "Pneumothorax": N},
    ),
    ("Lungs are free of edema.", {"Edema": N}),
    ("Negative for fracture.", {"Fracture": N}),
    ("Pneumothorax is no longer seen.", {"Pneumothorax": N}),
    ("The heart is normal in size.", {"Cardiomegaly": N}),
    ("Heart size is not enlarged.", {"Cardiomegaly": N}),
    (
        "Normal cardiomediastinal silhouette.",
        {"Cardiomegaly": N, "Enlarged Cardiomediastinum": N},
    ),
    (
        "The lungs are clear.",
        {"Lung Opacity": N, "Consolidation": N, "Pneumonia": N, "Edema": N, "Atelectasis": M},
    ),
    # an uncertainty adjective inside a negated list stays negative
    ("No focal consolidation, suspicious opacity, or effusion.", {"Lung Opacity": N, "Pleural Effusion": N}),
    # pseudo-negation: "no change" does not negate
    ("No change in the moderate cardiomegaly.", {"Cardiomegaly": P}),
    # uncertainty
    ("Possible small left effusion.", {"Pleural Effusion": U}),
    ("Cannot exclude early pneumonia.", {"Pneumonia": U}),
    ("Basilar opacity may represent atelectasis.", {"Atelectasis": U}),
    ("Findings suspicious for a mass.", {"Lung Lesion": U}),
    ("Pneumonia is not excluded.", {"Pneumonia": U}),
    ("Atelectasis versus consolidation.", {"Atelectasis": U, "Consolidation": U}),
    ("Borderline heart size.", {"Cardiomegaly": U}),
    # a clause break ends the negation's scope
    ("No pneumothorax, but there is a small effusion.", {"Pneumothorax": N, "Pleural Effusion": P}),
    ("No edema; however, the heart is enlarged.", {"Edema": N, "Cardiomegaly": P}),
    # aggregation across sentences
    ("No effusion on the right. Small left effusion.", {"Pleural Effusion": P}),
    ("No pneumonia. Possible pneumonia at the left base.", {"Pneumonia": U}),
    ("Possible small effusion. Definite right effusion.", {"Pleural Effusion": P}),
    # IU decisions: calcified granulomas are not lung lesions; "XXXX" is harmless
    ("Calcified granuloma in the left lower lobe.", {"Lung Lesion": M, "No Finding": P}),
    ("Old granulomatous infection.", {"Pneumonia": M}),
    ("XXXX XXXX. No XXXX pneumothorax. XXXX", {"Pneumothorax": N}),
]


@pytest.mark.parametrize("text, expected", CASES, ids=[c[0][:40] for c in CASES])
def test_label_report_sentence_table(text, expected):
    labels = label_report(text)
    assert set(labels) == set(CHEXPERT_OBSERVATIONS)
    assert {obs: labels[obs] for obs in expected} == expected


def test_no_finding_positive_when_only_devices_or_negatives():
    assert label_report("Right internal jugular catheter. Lungs are clear.")["No Finding"] == P
    assert label_report("No effusion or pneumothorax.")["No Finding"] == P


def test_no_finding_not_mentioned_when_a_finding_is_positive_or_uncertain():
    assert label_report("Mild cardiomegaly.")["No Finding"] == M
    assert label_report("Possible left basilar atelectasis.")["No Finding"] == M


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_report_raises(text):
    with pytest.raises(ValueError, match="empty report"):
        label_report(text)


def test_vectors_follow_chexpert_order_and_codes():
    vec = label_vector("Mild cardiomegaly. No pneumothorax.")
    assert vec.dtype == np.int8 and vec.shape == (14,)
    assert vec[CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] == 1
    assert vec[CHEXPERT_OBSERVATIONS.index("Pneumothorax")] == 0
    assert vec[CHEXPERT_OBSERVATIONS.index("Fracture")] == -2
    batch = label_reports(["Mild cardiomegaly. No pneumothorax.", "Possible effusion."])
    assert batch.shape == (2, 14) and batch.dtype == np.int8
    np.testing.assert_array_equal(batch[0], vec)


needs_iu = pytest.mark.skipif(
    importlib.util.find_spec("torchxrayvision") is None, reason="needs torchxrayvision (IU reports)"
)

# F1 measured on all 3,927 IU reports when this was written, minus a margin of 0.05.
F1_FLOORS = {
    "No Finding": 0.92,
    "Cardiomegaly": 0.93,
    "Pleural Effusion": 0.89,
    "Pneumothorax": 0.81,
    "Lung Opacity": 0.86,
    "Atelectasis": 0.85,
}


@needs_iu
def test_agreement_with_iu_mesh():
    from radrl.data.iu_reports import load_iu_reports
    from radrl.data.mesh_agreement import (
        SHARED_CLASSES,
        agreement_table,
        format_agreement_table,
    )

    reports = load_iu_reports()
    rows = agreement_table(reports)
    print("\n" + format_agreement_table(rows))
    assert [r["observation"] for r in rows] == list(SHARED_CLASSES)
    assert len(SHARED_CLASSES) == 14  # every CheXpert class has a MeSH counterpart
    by_name = {r["observation"]: r for r in rows}
    for obs, floor in F1_FLOORS.items():
        assert by_name[obs]["f1"] >= floor, f"{obs}: F1 {by_name[obs]['f1']:.3f} < {floor}"
    for row in rows:
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == len(reports)
        assert row["n_mesh_pos"] == row["tp"] + row["fn"]
