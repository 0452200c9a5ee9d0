"""The diagnostic classifier G of CXRL's r_diag: a torchxrayvision DenseNet.

Real: `xrv.models.DenseNet(weights="densenet121-res224-all")` (224 px, 18 outputs), read from
torchxrayvision's local cache since nothing can be downloaded here. Tiny: the same class with
small growth/blocks, trained by `radrl bootstrap` on phantoms for the paper's 11 classes.
Either way the wrapper takes images in [0, 1] and rescales them to xrv's [−1024, 1024].
"""

from __future__ import annotations

import os

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

    def __init__(self, densenet: xrv.models.DenseNet, targets: tuple[str, ...], resolution: int):
        super().__init__()
        self.densenet = densenet
        self.targets = tuple(targets)
        self.resolution = resolution

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        return images * 2048 - 1024  # xrv's pixel range

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Logits: xrv's forward applies op_threshs calibration / sigmoid we do not want in training.
        features = self.densenet.features2(self._prepare(images))
        return self.densenet.classifier(features)

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


def load_tiny_classifier(path) -> DiagnosticClassifier:
    """The tiny classifier from a file written by `save_classifier`."""
    model = tiny_classifier()
    model.densenet.load_state_dict(load_state(path))
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
    return DiagnosticClassifier(model, tuple(t for t in model.targets), resolution=224)


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
    return model.eval()


def save_classifier(model: DiagnosticClassifier, path) -> None:
    """Write the DenseNet's weights for `build_classifier` to read back.

    Kept in fp32: on xrv's ±1024 pixel scale the first BatchNorm's running variance
    overflows fp16 (which made every output constant).
    """
    save_state(model.densenet, path)
