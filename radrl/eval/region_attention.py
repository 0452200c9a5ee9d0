"""Where each region prompt looks: the region_query blocks' attention over the patch grid, drawn over the image."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from radrl.models.report_generator import REGIONS, atlas_prior


def attention_overlaps(attention: np.ndarray) -> dict:
    """How much the region attention maps [N, K, P] differ, as histogram intersections Σ_p min(a_p, b_p) (1: the
    same map, 0: disjoint): between regions (each image's K(K − 1)/2 region pairs, averaged) and between images (each
    region's N(N − 1)/2 image pairs, averaged). Regions that look at the same patches score ~1 between regions."""
    attention = np.asarray(attention, dtype=np.float64)
    n, k = attention.shape[:2]
    if n < 2 or k < 2:
        raise ValueError(f"attention_overlaps needs ≥ 2 images and ≥ 2 regions, got {n} and {k}")
    overlaps = {"between_regions": _mean_pairwise_intersection(attention.transpose(1, 0, 2)),
                "between_images": _mean_pairwise_intersection(attention), "images": n}
    side = int(round(attention.shape[-1] ** 0.5))
    if side * side == attention.shape[-1]:
        overlaps["in_box"] = attention_in_boxes(attention)
    return overlaps


def _mean_pairwise_intersection(maps: np.ndarray) -> float:
    """Σ_p min(a_p, b_p) averaged over every pair of rows of maps [M, …, P] along its first axis (and over the rest);
    one row against the later ones at a time, so memory stays at one row's pairs (real size: 196 patches)."""
    total, count = 0.0, 0
    for i in range(len(maps) - 1):
        intersections = np.minimum(maps[i], maps[i + 1:]).sum(-1)
        total, count = total + intersections.sum(), count + intersections.size
    return float(total / count)


def attention_in_boxes(attention: np.ndarray) -> float:
    """The share of each region's attention [N, K, P] (P = G × G patches) that falls on its atlas box (REGION_BOXES:
    the patches that overlap the box by more than half as much as its best patch), averaged over images and regions.
    Attention spread evenly would score each box's share of the grid: 0.016–0.25 on an 8 × 8 grid, 0.08 on average.
    A masked atlas (region_prior_floor 0) scores below 1: it also lets a region look at patches its box barely
    touches."""
    side = int(round(attention.shape[-1] ** 0.5))
    inside = (atlas_prior(REGIONS[:attention.shape[1]], side) > np.log(0.5)).numpy()
    return float((np.asarray(attention) * inside[None]).sum(-1).mean())


SHOWN_REGIONS = ("right lung", "left lung", "cardiac silhouette", "right costophrenic angle", "left costophrenic angle")


def write_region_attention(images: np.ndarray, attention: np.ndarray, path: Path,
                           regions: tuple[str, ...] = SHOWN_REGIONS) -> Path:
    """A grid: one row per image [N, 1, S, S], the image then each region's attention [N, K, P] (P = G × G patches,
    head- and block-averaged) upsampled over it. The patient's right lung is on the image's left."""
    side = int(round(attention.shape[-1] ** 0.5))
    columns = [REGIONS.index(name) for name in regions]
    figure, axes = plt.subplots(len(images), 1 + len(columns), figsize=(1.7 * (1 + len(columns)), 1.8 * len(images)),
                                squeeze=False)
    size = images.shape[-1]
    for row, image in enumerate(images):
        axes[row, 0].imshow(image[0], cmap="gray", vmin=0, vmax=1)
        for col, k in enumerate(columns, start=1):
            grid = attention[row, k].reshape(side, side)
            heat = np.kron(grid, np.ones((size // side, size // side)))
            axes[row, col].imshow(image[0], cmap="gray", vmin=0, vmax=1)
            axes[row, col].imshow(heat, cmap="inferno", alpha=0.6, vmin=0.0)  # dark = no attention
        if row == 0:
            for col, name in enumerate(("image", *regions)):
                axes[0, col].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    figure.suptitle("region prompts' attention over the patches (held-out images)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
