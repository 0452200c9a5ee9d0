"""`radrl train-posture`: the real config's posture regressor (ResNet-18) trained as the CXRL paper trains it.

No posture labels: the regressor predicts ψ, the image is warped back by M(ψ)⁻¹, and the loss is the L2 distance to
a canonical radiograph, the mean of 500 random training films (`alignment_loss`). Images come from a
MIMIC-CXR-JPG root (its train split, frontal films, one per study) or from any folder of PNG/JPEG files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from radrl.data.image_datasets import IMAGE_SUFFIXES, mimic_image_paths, read_image
from radrl.models.posture import PostureRegressor, alignment_loss, alignment_step, r_align
from radrl.models.weights import save_state
from radrl.progress import progress

log = logging.getLogger("radrl")
CANONICAL_FILMS = 500  # the paper's canonical image: the mean of 500 random training CXRs


def posture_image_files(source: Path, limit: int | None = None, seed: int = 0) -> list[Path]:
    """Training films: a MIMIC-CXR-JPG root's train split (PA/AP), or every PNG/JPEG under a folder; at most
    `limit` of them, a seeded draw."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder: give a MIMIC-CXR-JPG root or a folder of PNG/JPEG films")
    if any(source.glob("mimic-cxr-2.0.0-metadata.csv*")):
        files = mimic_image_paths(source, "train")
    else:
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG films under {source}")
    if limit is not None and limit < len(files):
        files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), limit, replace=False))]
    return files


class Films(torch.utils.data.Dataset):
    """Grayscale films [1, S, S] in [0, 1], read when asked (MIMIC has hundreds of thousands)."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_image(self.files[index], self.size)


def canonical_film(films: Films, seed: int, count: int = CANONICAL_FILMS) -> torch.Tensor:
    """Mean of `count` random films [1, 1, S, S] (all of them when there are fewer)."""
    chosen = np.random.default_rng(seed).choice(len(films), min(count, len(films)), replace=False)
    return torch.stack([films[int(i)] for i in chosen]).mean(dim=0, keepdim=True)


@torch.no_grad()
def mean_loss_and_r_align(model: PostureRegressor, loader, canonical: torch.Tensor) -> tuple[float, float]:
    model.eval()
    losses, rewards = [], []
    for batch in loader:
        losses.append(float(alignment_loss(model, batch, canonical)) * len(batch))
        rewards.append(r_align(model(batch)))
    return sum(losses) / len(loader.dataset), float(torch.cat(rewards).mean())


def train_posture_regressor(source: Path, out: Path, arch: str = "resnet18", image_size: int = 512, epochs: int = 10,
                            batch_size: int = 16, lr: float = 3e-4, limit: int | None = None, seed: int = 0,
                            workers: int = 0) -> dict:
    """Train, then write `out` (a PostureRegressor state dict, the file models.posture.weights names), the canonical
    film beside it (`<out>.canonical.png`) and a summary (`<out>.json`); returns the summary."""
    from PIL import Image

    start = time.perf_counter()
    torch.manual_seed(seed)
    films = Films(posture_image_files(source, limit, seed), image_size)
    canonical = canonical_film(films, seed)
    train = torch.utils.data.DataLoader(films, batch_size, shuffle=True, num_workers=workers,
                                        generator=torch.Generator().manual_seed(seed))
    measure = torch.utils.data.DataLoader(films, batch_size, num_workers=workers)
    model = PostureRegressor(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    before = mean_loss_and_r_align(model, measure, canonical)  # the upright start: ψ = identity for every film
    history = []
    for epoch in progress(range(epochs), desc="posture regressor", unit="epoch"):
        model.train()
        for batch in train:
            alignment_step(model, optimizer, batch, canonical)
        history.append(mean_loss_and_r_align(model, measure, canonical))
        log.info("posture epoch %d/%d: alignment L2 %.5f (upright %.5f), mean r_align %.4f", epoch + 1, epochs,
                 history[-1][0], before[0], history[-1][1])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_state(model.eval(), out)
    pixels = (canonical[0, 0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(out.with_suffix(".canonical.png"))
    summary = {"source": str(source), "films": len(films), "arch": arch, "image_size": image_size, "epochs": epochs,
               "batch_size": batch_size, "lr": lr, "seed": seed, "canonical_films": min(CANONICAL_FILMS, len(films)),
               "alignment_l2_upright": before[0], "alignment_l2_per_epoch": [h[0] for h in history],
               "mean_r_align_per_epoch": [h[1] for h in history], "seconds": time.perf_counter() - start}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary
