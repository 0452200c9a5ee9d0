"""Figures shared by training (TensorBoard, run folder) and evaluation."""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def image_grid_figure(reports: list[str], rows: dict[str, torch.Tensor], title: str):
    """A grid of grayscale images, one row per named set [n, 1, H, W], with wrapped report text above each column."""
    n = len(reports)
    figure, axes = plt.subplots(len(rows), n, figsize=(1.9 * n, 0.4 + 2.4 * len(rows)), squeeze=False)
    for row, (name, images) in enumerate(rows.items()):
        for column in range(n):
            ax = axes[row][column]
            ax.imshow(images[column, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(name)
    for column, report in enumerate(reports):
        axes[0][column].set_title(textwrap.fill(textwrap.shorten(report, 120), 28), fontsize=5.5, loc="left")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure
