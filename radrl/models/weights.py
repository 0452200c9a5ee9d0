"""Where model weights come from: the shipped tiny models, random init, or the user's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"


class MissingWeightsError(FileNotFoundError):
    """A weight file or folder the config names is not on disk."""


def embedded_path(name: str) -> Path:
    """Path of a shipped tiny model; a clear error if `radrl bootstrap` has not produced it."""
    path = EMBEDDED_DIR / name
    if not path.exists():
        raise MissingWeightsError(
            f"the embedded tiny model '{name}' is missing ({path}); run `radrl bootstrap` to train and write it"
        )
    return path


def local_path(spec: str, what: str, how_to: str) -> Path:
    """Resolve a user-given weight path, or stop with an error naming the file and how to supply it."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingWeightsError(f"{what}: '{spec}' does not exist. {how_to}")
    return path


def looks_like_hub_id(spec: str) -> bool:
    """'org/name' with no such local path: a hub id (only usable with a local HF cache here)."""
    return spec.count("/") == 1 and not Path(spec).expanduser().exists() and not spec.startswith((".", "/", "~"))


def load_state(path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch checkpoint, as float32."""
    state = load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, map_location="cpu")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def save_state(model: nn.Module, path, half: bool = False) -> None:
    """Write a state dict as safetensors; `half` stores float tensors as fp16 to keep the package small."""
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


@torch.no_grad()
def copy_named_tensors(module: nn.Module, state: dict, expected: set[str], mismatch: str) -> None:
    """Copy named tensors (numpy or torch) into `module`'s parameters (or buffers); the names must be exactly `expected`,
    else ValueError('<mismatch>: missing [...], unexpected [...]')."""
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{mismatch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    own = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    for name, value in state.items():
        # arrays from Ray's object store are read-only views: copy before wrapping
        own[name].copy_(torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value)
