"""The 14 CheXpert observations, in CheXpert's column order, and the label codes."""

from enum import IntEnum

CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


class Label(IntEnum):
    """What a report says about one observation (CheXpert's 1 / 0 / -1 / blank)."""

    POSITIVE = 1
    NEGATIVE = 0
    UNCERTAIN = -1
    NOT_MENTIONED = -2
