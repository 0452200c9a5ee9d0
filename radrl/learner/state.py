"""A learner's resumable state as flat named tensors (for safetensors checkpoints) plus JSON, and back."""

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


def training_state(optimizer: torch.optim.Optimizer, generator: torch.Generator, tracker, version: int
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """What every learner checkpoints besides its weights: optimizer, RNG states, advantage stat buffers (a
    tracker, or None for a learner without one), version."""
    tensors, param_groups = optimizer_tensors(optimizer)
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    buffers = {} if tracker is None else {report: list(buffer) for report, buffer in tracker.buffers.items()}
    meta = {"weight_version": version, "optimizer_param_groups": param_groups, "stat_buffers": buffers}
    return tensors, meta


def load_training_state(optimizer: torch.optim.Optimizer, generator: torch.Generator, tracker, tensors: dict,
                        meta: dict, device: str) -> int:
    """Restore what `training_state` returned; returns the weight version."""
    load_optimizer(optimizer, tensors, meta["optimizer_param_groups"], device)
    generator.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    if tracker is not None:
        tracker.buffers.clear()  # the saved buffers replace what is there (a rollback, or a fresh learner)
        for report, values in meta["stat_buffers"].items():
            tracker.buffers[report].extend(values)
    return meta["weight_version"]
