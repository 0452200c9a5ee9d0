"""Checkpoints: safetensors for tensors, JSON for the rest, each written atomically as one folder.

    <run_dir>/checkpoints/iter_000010/{tensors.safetensors, state.json}

The folder is written under a temporary name, its files flushed to disk (fsync), and renamed into
place, so a crash mid-write never leaves a half checkpoint that `--resume` would pick up. Replacing
an existing checkpoint moves the old one aside first and deletes it only once the new one is in
place; if a crash falls between the two renames, `latest_checkpoint` puts the old one back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "iter_"
REPLACED = ".replaced-"  # an old checkpoint moved aside while its replacement is renamed in


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder's fsync makes its renames durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(run_dir: Path, iteration: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint `iteration` atomically and durably; returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{iteration:06d}"
    final, replaced = root / name, root / f"{REPLACED}{name}"
    staging = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "tensors.safetensors")
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    for path in (staging / "tensors.safetensors", staging / "state.json", staging):
        _fsync(path)
    if final.exists():  # re-saving the same iteration (e.g. after an interrupted run): the old one aside first
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync(root)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None (an old one left aside by a crash mid-replace
    is put back first)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for aside in root.glob(f"{REPLACED}{PREFIX}*"):
        final = root / aside.name.removeprefix(REPLACED)
        if final.exists():
            shutil.rmtree(aside)  # the replacement made it: the old copy is garbage
        else:
            os.replace(aside, final)
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder, with a clear error if it is incomplete."""
    folder = Path(folder)
    for name in ("tensors.safetensors", "state.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {name}; delete the folder to resume from an older one")
    return load_file(folder / "tensors.safetensors"), json.loads((folder / "state.json").read_text())
