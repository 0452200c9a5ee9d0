"""Checkpoints: safetensors for tensors, JSON for the rest, each written atomically as one folder.

    <run_dir>/checkpoints/iter_000010/{tensors.safetensors, state.json}

The folder is written under a temporary name and renamed into place, so a crash mid-write
never leaves a half checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "iter_"


def save_checkpoint(run_dir: Path, iteration: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint `iteration` atomically; returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{iteration:06d}"
    staging = root / f".tmp-{PREFIX}{iteration:06d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "tensors.safetensors")
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():  # re-saving the same iteration (e.g. after an interrupted run): replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder, with a clear error if it is incomplete."""
    folder = Path(folder)
    for name in ("tensors.safetensors", "state.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {name}; delete the folder to resume from an older one")
    return load_file(folder / "tensors.safetensors"), json.loads((folder / "state.json").read_text())
