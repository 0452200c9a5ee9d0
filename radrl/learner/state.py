"""Optimizer state as flat named tensors (for safetensors checkpoints) and back."""

from __future__ import annotations

import torch


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optimizer") -> tuple[dict, list]:
    """({'<prefix>/<param index>/<slot>': tensor}, param_groups): copies, safe to keep while training goes on."""
    state = optimizer.state_dict()
    tensors = {f"{prefix}/{index}/{slot}": torch.as_tensor(value).detach().cpu().clone()
               for index, slots in state["state"].items() for slot, value in slots.items()}
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, param_groups: list, device: str,
                   prefix: str = "optimizer") -> None:
    """Restore what `optimizer_tensors` returned."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "/"):
            _, index, slot = key.split("/")
            state.setdefault(int(index), {})[slot] = value.to(device) if value.dim() else value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
