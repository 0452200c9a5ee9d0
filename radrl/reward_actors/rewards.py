"""CXRL's three reward models, each behind the one reward contract.

    reward = Reward(cfg, device)                   # heavy setup once: the frozen model
    scores, info = reward(images, reports, metadata)   # images [B, 1, H, W] in [0, 1] → scores [B]

Each returns the *direct* score of an image (r_align, diagnostic accuracy, image–report cosine).
Turning direct scores into CXRL's comparative rewards against the anchor is `rlcf.combine`'s job.
"""

from __future__ import annotations

import numpy as np
import torch

from radrl.config import DataConfig, ModelsConfig
from radrl.data.labeler import label_reports
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label
from radrl.data.report_pool import report_pool
from radrl.models.classifier import PAPER_CLASSES, build_classifier
from radrl.models.clip import ImageReportClip, build_clip
from radrl.models.posture import build_posture, r_align


def _check_images(images: torch.Tensor, reports: list[str], reward: str) -> None:
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"{reward}: expected grayscale images [B, 1, H, W], got shape {tuple(images.shape)}")
    if len(reports) != images.shape[0]:
        raise ValueError(f"{reward}: {images.shape[0]} images but {len(reports)} reports; pass one report per image")
    if not torch.isfinite(images).all():
        raise ValueError(f"{reward}: images contain NaN or inf; the sampler diverged (lower the learning rate)")


class PostureReward:
    """r_align(ψ) of each image, ψ from the frozen posture regressor (not comparative)."""

    name = "align"

    def __init__(self, models: ModelsConfig, device: str = "cpu"):
        self.model = build_posture(models.posture).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, reports: list[str], metadata: dict | None = None):
        _check_images(images, reports, self.name)
        posture = self.model(images.to(self.device)).cpu()
        scores = r_align(posture).numpy()
        return scores, {"posture": posture.numpy()}


def report_targets(reports: list[str], class_names: tuple[str, ...]) -> np.ndarray:
    """Per-image targets for the classifier's classes from the labeler: 1, 0, or NaN (not scored).

    POSITIVE → 1. NEGATIVE and NOT_MENTIONED → 0: a radiology report lists what it sees, so an
    observation it does not mention is taken as absent (CheXpert's blank-as-negative convention
    for evaluation). UNCERTAIN ("may represent", "cannot exclude") → not scored: the report does
    not say which answer is right.
    """
    labels = label_reports(reports)  # [B, 14] Label values
    columns = [CHEXPERT_OBSERVATIONS.index(name) for name in class_names]
    chosen = labels[:, columns]
    targets = (chosen == Label.POSITIVE).astype(np.float64)
    targets[chosen == Label.UNCERTAIN] = np.nan
    return targets


def diagnostic_accuracy(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """accuracy(G(x)): share of scored classes where (p ≥ 0.5) equals the report's target, [B, C] → [B].

    p is the classifier's calibrated output (DiagnosticClassifier.probabilities), whose 0.5 is each
    class's operating point.

    Classes with a NaN target are left out; an image with no scored class gets accuracy 0 (it
    cannot happen with the paper's 11 classes unless all 11 are uncertain).
    """
    scored = ~np.isnan(targets)
    correct = ((probabilities >= 0.5) == (targets == 1)) & scored
    counts = scored.sum(axis=1)
    return np.where(counts > 0, correct.sum(axis=1) / np.maximum(counts, 1), 0.0)


def diagnostic_balanced_accuracy(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per image, the mean of sensitivity (over its scored positive classes) and specificity (over its scored
    negative ones); an image with only one kind gets that one alone, with none 0. [B, C] → [B].

    Accuracy counts every class alike, so with 1–2 positives among 11 classes a reward that reads everything
    negative scores ≥ 0.8; here missing the one finding costs half the score.
    """
    scored = ~np.isnan(targets)
    predicted, positive = probabilities >= 0.5, (targets == 1) & scored
    negative = scored & ~positive
    hits, rejections = (predicted & positive).sum(axis=1), (~predicted & negative).sum(axis=1)
    n_pos, n_neg = positive.sum(axis=1), negative.sum(axis=1)
    sensitivity = np.where(n_pos > 0, hits / np.maximum(n_pos, 1), np.nan)
    specificity = np.where(n_neg > 0, rejections / np.maximum(n_neg, 1), np.nan)
    both = np.stack([sensitivity, specificity])
    counted = (~np.isnan(both)).sum(axis=0)
    return np.where(counted > 0, np.nansum(both, axis=0) / np.maximum(counted, 1), 0.0)


def label_prevalence(targets: np.ndarray) -> np.ndarray:
    """Each class's share of positives among the scored targets [N, C] (NaN: not scored) → [C], kept inside
    [1/(2N), 1 − 1/(2N)] so that a class with no positive (or no negative) in the pool keeps a finite weight."""
    scored = (~np.isnan(targets)).sum(axis=0)
    share = np.nansum(targets, axis=0) / np.maximum(scored, 1)
    floor = 0.5 / max(len(targets), 1)
    return np.clip(share, floor, 1 - floor)


def diagnostic_prevalence_weighted(probabilities: np.ndarray, targets: np.ndarray,
                                   prevalence: np.ndarray) -> np.ndarray:
    """Per image, the sum over its scored classes of the calibrated probability of the report's label (p for a
    positive, 1 − p for a negative), weighted by 1 / (2π_c) for a positive and 1 / (2(1 − π_c)) for a negative,
    divided by the number of classes; π_c is the class's positive share among the training reports [C].
    [B, C] → [B].

    Over the training reports each class's positives and negatives then weigh ½ each, so raising or lowering one
    class's probability by the same amount on every image leaves the expected reward unchanged: only separating
    the images with a finding from those without it (what AUROC measures) pays. (Dividing by the scored classes
    instead would weigh the classes of an image with an uncertain label more and break that balance.) Accuracy,
    and the per-image balanced form, pay for lowering every probability when most reports are normal. The balance
    holds over the batch, not within one report's images: use it with batch-wide advantages
    (learner.per_prompt_stats: false).
    """
    return prevalence_weighted_score(torch.from_numpy(np.asarray(probabilities, dtype=np.float64)), targets,
                                     prevalence).numpy()


def prevalence_weighted_score(probabilities: torch.Tensor, targets: np.ndarray,
                              prevalence: np.ndarray) -> torch.Tensor:
    """diagnostic_prevalence_weighted on a tensor [B, C] → [B], differentiable in the probabilities (DRaFT's r_diag)."""
    scored = torch.from_numpy(~np.isnan(targets)).to(probabilities.device)
    positive = torch.from_numpy(np.nan_to_num(targets) == 1).to(probabilities.device) & scored
    share = torch.as_tensor(prevalence, dtype=probabilities.dtype, device=probabilities.device)
    weights = torch.where(positive, 0.5 / share, 0.5 / (1 - share))
    terms = torch.where(scored, weights * torch.where(positive, probabilities, 1 - probabilities), 0.0)
    return terms.sum(dim=1) / targets.shape[1]


class DiagnosisReward:
    """r_diag: the frozen torchxrayvision classifier G's decisions (or, prevalence_weighted, its calibrated
    probabilities) against the report's labels, by rewards.diag_metric (accuracy, the paper's, by default).

    Scores the paper's 11 classes where the classifier has them and an operating point for them
    (all 11 for the tiny and the densenet121-res224-all models), deciding at each operating point.
    """

    name = "diag"

    def __init__(self, models: ModelsConfig, device: str = "cpu", metric: str = "accuracy",
                 training_reports: list[str] | None = None):
        self.model = build_classifier(models.classifier).to(device).eval()
        self.device = device
        names = self.model.chexpert_names()
        calibrated = self.model.calibrated_targets()
        self.columns = [i for i, target in enumerate(self.model.targets)
                        if target in PAPER_CLASSES and target in calibrated]
        self.class_names = tuple(names[i] for i in self.columns)
        if not self.columns:
            raise ValueError(f"models.classifier: none of its targets {self.model.targets} is one of CXRL's classes "
                             f"{PAPER_CLASSES} with an operating point; use a torchxrayvision model trained on those")
        if metric == "prevalence_weighted":
            if not training_reports:
                raise ValueError("rewards.diag_metric 'prevalence_weighted' weighs each class by its share among the "
                                 "training reports: give the reward those reports")
            self.prevalence = label_prevalence(report_targets(list(training_reports), self.class_names))
            self.metric = lambda p, t: diagnostic_prevalence_weighted(p, t, self.prevalence)
        else:
            self.metric = {"accuracy": diagnostic_accuracy, "balanced": diagnostic_balanced_accuracy}[metric]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, reports: list[str], metadata: dict | None = None):
        _check_images(images, reports, self.name)
        probabilities = self.model.probabilities(images.to(self.device)).cpu().numpy()[:, self.columns]
        targets = report_targets(reports, self.class_names)
        scores = self.metric(probabilities, targets)
        return scores, {"probabilities": probabilities, "scored_classes": (~np.isnan(targets)).sum(axis=1)}


class ConsistencyReward:
    """cos(F_v(x), F_t(y)): how well an image matches its report in the frozen CLIP's space."""

    name = "consist"

    def __init__(self, models: ModelsConfig, device: str = "cpu"):
        self.model: ImageReportClip = build_clip(models.clip).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, reports: list[str], metadata: dict | None = None):
        _check_images(images, reports, self.name)
        if any(not report.strip() for report in reports):
            raise ValueError("consist: an empty report cannot be scored; drop empty reports from the data")
        image_features = self.model.encode_images(images.to(self.device))
        text_features = self.model.encode_reports(list(reports))
        scores = (image_features * text_features).sum(dim=-1).cpu().numpy()
        return scores.astype(np.float64), {}


REWARDS = {cls.name: cls for cls in (PostureReward, DiagnosisReward, ConsistencyReward)}


def build_reward(name: str, models: ModelsConfig, device: str = "cpu", diag_metric: str = "accuracy",
                 data: DataConfig | None = None):
    """The reward model called `name` ('align', 'diag' or 'consist'); `diag_metric`: rewards.diag_metric (its
    'prevalence_weighted' form reads the class shares of the training reports of `data`)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
    if name == "diag":
        training = report_pool(data, "train") if diag_metric == "prevalence_weighted" and data is not None else None
        return DiagnosisReward(models, device, diag_metric, training)
    return REWARDS[name](models, device)
