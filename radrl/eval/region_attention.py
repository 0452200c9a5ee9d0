"""Where each region prompt looks: the region_query blocks' attention over the patch grid, drawn over the image."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from radrl.models.report_generator import REGIONS

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
            axes[row, col].imshow(heat, cmap="inferno", alpha=0.6)
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
