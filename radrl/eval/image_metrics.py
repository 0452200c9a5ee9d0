"""Image-generation metrics (CXRL's evaluation table), each a thin call into torchmetrics.

- FID: torchmetrics' FrechetInceptionDistance with the diagnostic classifier's pooled
  torchxrayvision DenseNet features as the feature extractor (1024-d for DenseNet-121; the
  tiny embedded DenseNet has 32-d features). Real images: the held-out reports' own images.
- AUROC: torchmetrics' binary AUROC per class of the classifier's probability on generated
  images against the report's labels (uncertain labels left out); classes whose targets are
  all one value have no AUROC and are left out of the mean.
- MS-SSIM diversity: torchmetrics' multi-scale SSIM between every pair of samples of the same
  report, averaged (1 = identical samples, lower = more diverse). The standard 5 scales and an
  11-px window need images over 160 px; smaller images use the 3 finest scales (their betas
  renormalised) and a 7-px window.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from radrl.models.classifier import DiagnosticClassifier

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first


class DenseNetFeatures(nn.Module):
    """Images [B, 1, H, W] in [0, 1] → pooled DenseNet features [B, F] (torchmetrics' `feature` contract)."""

    def __init__(self, classifier: DiagnosticClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.densenet.classifier.in_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())


def fid(real: torch.Tensor, generated: torch.Tensor, classifier: DiagnosticClassifier, batch_size: int = 64) -> float:
    """Fréchet distance between the DenseNet features of two image sets [N, 1, H, W] in [0, 1]."""
    if len(real) < 2 or len(generated) < 2:
        raise ValueError(f"FID needs at least 2 images per set (got {len(real)} real, {len(generated)} generated)")
    metric = FrechetInceptionDistance(feature=DenseNetFeatures(classifier), normalize=True,
                                      input_img_size=tuple(real.shape[1:]))
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start:start + batch_size], real=is_real)
    return float(metric.compute())


def per_class_auroc(probabilities: np.ndarray, targets: np.ndarray, class_names: tuple[str, ...]) -> dict[str, float]:
    """AUROC per class: probabilities [N, C] against targets [N, C] of 1, 0 or NaN (not scored).

    Returns class → AUROC for classes with both positive and negative targets, plus 'mean' over them.
    """
    result = {}
    for c, name in enumerate(class_names):
        scored = ~np.isnan(targets[:, c])
        labels = targets[scored, c]
        if labels.min(initial=1) == labels.max(initial=0):  # one class only (or nothing scored): undefined
            continue
        result[name] = float(binary_auroc(torch.from_numpy(probabilities[scored, c]).double(),
                                          torch.from_numpy(labels).long()))
    if not result:
        raise ValueError("AUROC: no class has both positive and negative reports; evaluate on more reports")
    result["mean"] = float(np.mean(list(result.values())))
    return result


def ms_ssim_settings(size: int) -> tuple[int, tuple[float, ...]]:
    """(window, betas) for images of side `size`: the standard ones when they fit, else 3 scales of a 7-px window."""
    if size > (11 - 1) * 2 ** (len(MS_SSIM_BETAS) - 1):
        return 11, MS_SSIM_BETAS
    betas = np.array(MS_SSIM_BETAS[:3])
    if size <= (7 - 1) * 2 ** 2:
        raise ValueError(f"MS-SSIM needs images larger than 24 px, got {size} px")
    return 7, tuple((betas / betas.sum()).tolist())


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of image pairs a[i], b[i], each [N, 1, H, W] in [0, 1] → [N]."""
    window, betas = ms_ssim_settings(a.shape[-1])
    return multiscale_structural_similarity_index_measure(a.float(), b.float(), data_range=1.0, kernel_size=window,
                                                          betas=betas, reduction="none")


def ms_ssim_diversity(groups: torch.Tensor) -> float:
    """Mean MS-SSIM over every pair of samples within each group: [G, K, 1, H, W] with K ≥ 2 samples per report."""
    if groups.dim() != 5 or groups.shape[1] < 2:
        raise ValueError(f"expected [reports, samples ≥ 2, 1, H, W], got shape {tuple(groups.shape)}")
    pairs = list(combinations(range(groups.shape[1]), 2))
    first = torch.cat([groups[:, i] for i, _ in pairs])
    second = torch.cat([groups[:, j] for _, j in pairs])
    return float(ms_ssim(first, second).mean())
