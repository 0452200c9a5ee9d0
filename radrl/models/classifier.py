"""The diagnostic classifier G of CXRL's r_diag: a torchxrayvision DenseNet.

Real: `xrv.models.DenseNet(weights="densenet121-res224-all")` (224 px, 18 outputs), read from
torchxrayvision's local cache since nothing can be downloaded here. Tiny: the same class with
small growth/blocks, trained by `radrl bootstrap` on phantoms for the paper's 11 classes.
Either way the wrapper takes images in [0, 1] and rescales them to xrv's [−1024, 1024].

Decisions use the model's operating points as torchxrayvision intends: xrv's `op_norm` maps the
sigmoid so that each class's operating point (`op_threshs`, Youden's J on validation data) lands
at 0.5. xrv's weights carry theirs (0.002–0.20 for densenet121-res224-all: at a plain 0.5 almost
every class would read negative on real images); the tiny classifier's are chosen the same way
on validation phantoms by `radrl bootstrap` and shipped beside it (`classifier_op_threshs.json`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchxrayvision as xrv
from torch import nn

from radrl.config import EMBEDDED, RANDOM, ClassifierConfig
from radrl.models.weights import MissingWeightsError, embedded_path, load_state, local_path, save_state

# The 11 classes of CXRL's per-class AUROC, in torchxrayvision's spelling.
PAPER_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Pneumothorax", "Edema", "Effusion", "Pneumonia",
    "Cardiomegaly", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
# torchxrayvision name → CheXpert observation name (radrl.data.observations), where they differ.
XRV_TO_CHEXPERT = {"Effusion": "Pleural Effusion"}

TINY_ARCH = dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)
DENSENET121 = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)


class DiagnosticClassifier(nn.Module):
    """Images [B, 1, H, W] in [0, 1] → logits [B, len(targets)] of a torchxrayvision DenseNet."""

    def __init__(self, densenet: xrv.models.DenseNet, targets: tuple[str, ...], resolution: int,
                 op_threshs: torch.Tensor | None = None):
        super().__init__()
        self.densenet = densenet
        self.targets = tuple(targets)
        self.resolution = resolution
        if op_threshs is not None and len(op_threshs) != len(self.targets):
            raise ValueError(f"{len(op_threshs)} operating points for {len(self.targets)} classifier targets")
        # per target, the sigmoid output that is the decision boundary (NaN: none known); None: uncalibrated
        self.register_buffer("op_threshs", None if op_threshs is None else torch.as_tensor(op_threshs).float(),
                             persistent=False)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return images * 2048 - 1024  # xrv's pixel range

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Logits: xrv's forward applies op_threshs calibration / sigmoid we do not want in training.
        features = self.densenet.features2(self._prepare(images))
        return self.densenet.classifier(features)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[B, len(targets)] calibrated as xrv does (sigmoid, then op_norm: 0.5 is each class's operating point).
        Targets without an operating point (NaN) read 0.5 there, as in xrv; uncalibrated models give the sigmoid."""
        probabilities = torch.sigmoid(self(images))
        if self.op_threshs is None:
            return probabilities
        return xrv.models.op_norm(probabilities, self.op_threshs.to(probabilities.device))

    def calibrated_targets(self) -> tuple[str, ...]:
        """The targets whose decision at 0.5 means something: those with an operating point, or all if uncalibrated."""
        if self.op_threshs is None:
            return self.targets
        return tuple(t for t, o in zip(self.targets, self.op_threshs.tolist()) if not np.isnan(o))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled DenseNet features (1024-d for DenseNet-121), as used for FID."""
        return self.densenet.features2(self._prepare(images))

    def chexpert_names(self) -> tuple[str, ...]:
        """The targets in the labeler's (CheXpert) spelling."""
        return chexpert_names(self.targets)


def chexpert_names(xrv_targets: tuple[str, ...]) -> tuple[str, ...]:
    """torchxrayvision class names in the labeler's (CheXpert) spelling."""
    return tuple(XRV_TO_CHEXPERT.get(t, t) for t in xrv_targets)


def tiny_classifier(targets: tuple[str, ...] = PAPER_CLASSES, resolution: int = 32) -> DiagnosticClassifier:
    """A small randomly initialised xrv DenseNet for the embedded world's phantoms."""
    return DiagnosticClassifier(xrv.models.DenseNet(num_classes=len(targets), **TINY_ARCH), targets, resolution)


def operating_points_path(weights) -> Path:
    """The operating points shipped beside a classifier's weights file."""
    weights = Path(weights)
    return weights.with_name(weights.stem + "_op_threshs.json")


def save_operating_points(model: DiagnosticClassifier, thresholds, weights_path) -> Path:
    """Write one operating point per target (null where none) beside the weights file."""
    values = {t: (None if np.isnan(v) else float(v)) for t, v in zip(model.targets, np.asarray(thresholds, float))}
    path = operating_points_path(weights_path)
    path.write_text(json.dumps({"method": "Youden's J (max TPR - FPR) on validation phantoms, as xrv's "
                                          "model_calibrate.py", "op_threshs": values}, indent=2))
    return path


def read_operating_points(weights_path, targets: tuple[str, ...]) -> torch.Tensor | None:
    """The operating points beside a weights file, in target order (NaN where missing); None if there is no file."""
    path = operating_points_path(weights_path)
    if not path.is_file():
        return None
    values = json.loads(path.read_text())["op_threshs"]
    return torch.tensor([np.nan if values.get(t) is None else values[t] for t in targets], dtype=torch.float32)


def youden_operating_points(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per class, the sigmoid output maximising TPR − FPR (Youden's J), the rule of torchxrayvision's
    scripts/model_calibrate.py; NaN for a class without both outcomes. probabilities, targets [N, C] → [C]."""
    thresholds = np.full(probabilities.shape[1], np.nan)
    for c in range(probabilities.shape[1]):
        truth = np.asarray(targets[:, c]) > 0.5
        if truth.all() or not truth.any():
            continue
        scores = np.asarray(probabilities[:, c], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        ordered = scores[order]
        last = np.r_[np.nonzero(np.diff(ordered))[0], len(ordered) - 1]  # last index of each distinct score
        tpr = np.cumsum(truth[order])[last] / truth.sum()
        fpr = np.cumsum(~truth[order])[last] / (~truth).sum()
        thresholds[c] = ordered[last][int(np.argmax(tpr - fpr))]  # predicting score ≥ threshold as present
    return thresholds


def load_tiny_classifier(path) -> DiagnosticClassifier:
    """The tiny classifier from a file written by `save_classifier`, with its shipped operating points if present."""
    model = tiny_classifier()
    model.densenet.load_state_dict(load_state(path))
    model.op_threshs = read_operating_points(path, model.targets)
    return model.eval()


def _xrv_named(name: str) -> DiagnosticClassifier:
    url = xrv.models.model_urls[name]["weights_url"]
    cached = os.path.join(os.path.expanduser(xrv.utils.get_cache_dir()), os.path.basename(url))
    if not os.path.isfile(cached):
        raise MissingWeightsError(
            f"torchxrayvision weights '{name}' are not in its cache ({cached}) and cannot be downloaded here. "
            f"Fetch {url} where you have network access and copy it to that path"
        )
    model = xrv.models.DenseNet(weights=name)
    op_threshs = getattr(model, "op_threshs", None)  # xrv's calibration for these weights (NaN where none)
    model.op_threshs = None  # applied by DiagnosticClassifier.probabilities; the DenseNet returns logits
    return DiagnosticClassifier(model, tuple(t for t in model.targets), resolution=224, op_threshs=op_threshs)


def build_classifier(cfg: ClassifierConfig) -> DiagnosticClassifier:
    """Build the classifier the config names."""
    if cfg.weights == RANDOM:
        if cfg.arch == "tiny":
            return tiny_classifier()
        return DiagnosticClassifier(xrv.models.DenseNet(**DENSENET121), tuple(xrv.datasets.default_pathologies), 224)
    if cfg.weights == EMBEDDED:
        return load_tiny_classifier(embedded_path("classifier.safetensors"))
    if cfg.weights in xrv.models.model_urls:
        return _xrv_named(cfg.weights).eval()
    path = local_path(cfg.weights, "models.classifier.weights",
                      "Give a torchxrayvision name (e.g. densenet121-res224-all, in its local cache) or a .safetensors "
                      "state dict of xrv.models.DenseNet-121 with the 18 default targets")
    model = DiagnosticClassifier(xrv.models.DenseNet(**DENSENET121), tuple(xrv.datasets.default_pathologies), 224)
    model.densenet.load_state_dict(load_state(path))
    model.op_threshs = read_operating_points(path, model.targets)
    if model.op_threshs is None:
        warnings.warn(f"models.classifier.weights: no operating points beside {path} "
                      f"({operating_points_path(path).name}); r_diag decides at a plain sigmoid 0.5, which "
                      "reads almost every finding negative for xrv-style models. Write one with "
                      "radrl.models.classifier.save_operating_points", stacklevel=2)
    return model.eval()


def save_classifier(model: DiagnosticClassifier, path) -> None:
    """Write the DenseNet's weights for `build_classifier` to read back.

    Kept in fp32: on xrv's ±1024 pixel scale the first BatchNorm's running variance
    overflows fp16 (which made every output constant).
    """
    save_state(model.densenet, path)
