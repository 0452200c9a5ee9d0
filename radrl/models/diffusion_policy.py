"""The CXRL policy: the frozen diffusion generator + LoRA on the UNet's attention + ACE tokens.

ACE (adaptive condition embeddings) are N learnable vectors c_s ∈ R^{N×d} placed in front of
the frozen text features c_p: c = [c_s, c_p]. They go in front of the empty-prompt features of
the unconditional branch too, so classifier-free guidance contrasts the report with no report
under the same learned prefix. The anchor (RLCF's frozen reference) is the same modules with
the LoRA adapter disabled and no ACE prefix: no second copy of the base model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch import nn

from radrl.models.diffusion import DiffusionModels
from radrl.models.weights import copy_named_tensors


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PublishedWeights:
    """One version of the trainable tensors (LoRA + ACE) as the learner broadcasts them."""

    version: int
    tensors: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], state: dict, where: str) -> PublishedWeights:
        """The LoRA + ACE of a CXRL checkpoint's tensors (its `policy/…` names) at its weight version."""
        weights = {k.removeprefix("policy/"): v.numpy() for k, v in tensors.items() if k.startswith("policy/")}
        if not weights:
            raise ValueError(f"{where} holds no CXRL policy tensors (policy/…); is it an LM-RRG checkpoint?")
        return cls(state["weight_version"], weights)


class DiffusionPolicy(nn.Module):
    """UNet noise prediction for the policy (LoRA + ACE) or, inside `anchor()`, the base model."""

    def __init__(self, models: DiffusionModels, lora_rank: int, lora_alpha: float, lora_targets: tuple[str, ...],
                 ace_tokens: int):
        super().__init__()
        self.models = models
        for module in (models.unet, models.text_encoder):
            module.requires_grad_(False)
        models.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                           target_modules=list(lora_targets)))
        self.unet = models.unet  # a submodule, so parameters() / state_dict() see the LoRA weights
        width = models.unet.config.cross_attention_dim
        self.ace = nn.Parameter(torch.randn(ace_tokens, width) * 0.02) if ace_tokens else None
        self._anchor = False
        self.compute_dtype = torch.float32  # of the frozen modules; see `accelerate`

    def accelerate(self, precision: str = "fp32", channels_last: bool = False, compile_unet: bool = False
                   ) -> DiffusionPolicy:
        """Speed settings (`models.diffusion`): bf16 storage and compute for the frozen UNet, text encoder and
        VAE, with the LoRA matrices and ACE kept in fp32 (peft runs each adapter in its own dtype, so the
        optimizer updates fp32 master weights); channels-last convolutions; torch.compile of the UNet.
        Attention is diffusers' default processor, which calls PyTorch SDPA."""
        self.compute_dtype = PRECISIONS[precision]
        if self.compute_dtype != torch.float32:
            for module in (self.models.unet, self.models.text_encoder, self.models.vae):
                if module is not None:  # nn.Module.to: diffusers' own .to(dtype) warns even with no fp32-only module
                    nn.Module.to(module, self.compute_dtype)
            cast_training_params(self.unet, torch.float32)  # LoRA back to fp32 (it is what requires grad)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile_unet:
            self.unet.compile()
        return self

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA matrices (peft marks them requires_grad)."""
        return [p for n, p in self.unet.named_parameters() if "lora_" in n]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that trains (LoRA + ACE), by name: what the learner broadcasts."""
        state = {f"unet.{n}": p.detach() for n, p in self.unet.named_parameters() if "lora_" in n}
        if self.ace is not None:
            state["ace"] = self.ace.detach()
        return state

    def load_trainable_state(self, state: dict) -> None:
        """Copy broadcast LoRA + ACE tensors (numpy or torch, by `trainable_state` name) into the policy."""
        copy_named_tensors(self, state, set(self.trainable_state()),
                           "trainable state does not match this policy (LoRA rank/targets or ACE tokens differ?)")

    @contextmanager
    def anchor(self):
        """Run the frozen base model: LoRA disabled and no ACE prefix."""
        self.unet.disable_adapters()
        self._anchor = True
        try:
            yield self
        finally:
            self.unet.enable_adapters()
            self._anchor = False

    def condition(self, text_features: torch.Tensor) -> torch.Tensor:
        """c = [c_s, c_p] for the policy; c_p alone for the anchor.  [B, M, d] → [B, N+M, d]."""
        if self._anchor or self.ace is None:
            return text_features
        prefix = self.ace.to(text_features.dtype).expand(text_features.shape[0], -1, -1)
        return torch.cat([prefix, text_features], dim=1)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                      guidance_scale: float) -> torch.Tensor:
        """ε̂ = ε(x, ∅) + w·(ε(x, c) − ε(x, ∅)), both branches in one UNet call (w = 1: no guidance)."""
        x = x.to(self.compute_dtype)  # the UNet runs in its storage dtype; ε̂ comes back as fp32
        if guidance_scale == 1.0:
            return self.unet(x, t, encoder_hidden_states=self.condition(cond)).sample.float()
        both = torch.cat([self.condition(uncond), self.condition(cond)])
        t = t.repeat(2) if t.dim() else t
        eps_uncond, eps_cond = self.unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.float().chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
