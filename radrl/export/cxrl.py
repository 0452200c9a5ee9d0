"""A trained CXRL policy as diffusers loads it: the UNet LoRA in diffusers' own LoRA file, the ACE tokens beside it.

    DIR/pytorch_lora_weights.safetensors   StableDiffusionPipeline.save_lora_weights (LoRA config as metadata)
    DIR/ace.safetensors                    "ace": the N × d condition tokens placed before the text features
    DIR/base/                              the base pipeline, when the config's is not already a diffusers
                                           pipeline folder (the shipped tiny model: pixel space, no VAE)
    DIR/export.json, DIR/README.md         what was exported, from which run, and how to load it

ACE is a prefix on the text encoder's output, not a token of its vocabulary (so no textual-inversion embedding):
`ace_prompt_embeds` builds the pipeline's `prompt_embeds` and `negative_prompt_embeds` the way radrl samples,
[ACE, text features] for the report and [ACE, features of ""] for the unconditional branch.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils import logging as diffusers_logging
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from radrl.config import EMBEDDED, RANDOM, ExperimentConfig
from radrl.export import read_export, write_export
from radrl.models.diffusion_policy import DiffusionPolicy, PublishedWeights

ACE_FILE = "ace.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for


@contextmanager
def quiet_diffusers():
    """Without diffusers' notices that do not apply here: a clipping scheduler's deprecation note (the pixel-space
    model clips on purpose), "vae=None cannot be saved", "no LoRA keys for the text encoder" (none trained)."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def policy_from_checkpoint(cfg: ExperimentConfig, tensors: dict[str, torch.Tensor], state: dict) -> DiffusionPolicy:
    """The config's policy (CPU, fp32) holding a checkpoint's LoRA + ACE."""
    from radrl.rollout.worker import build_policy

    weights = PublishedWeights.from_checkpoint(tensors, state, "the checkpoint")
    speed = cfg.models.diffusion
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"diffusion": speed.model_copy(update={
        "precision": "fp32", "compile": False, "channels_last": False})})})
    policy = build_policy(cfg, "cpu")
    policy.load_trainable_state(weights.tensors)
    return policy


def base_pipeline_source(cfg: ExperimentConfig) -> str | None:
    """The base model as diffusers' from_pretrained takes it, or None when the export must write one: a local
    folder with model_index.json, or a hub id; the shipped/random models and bare radrl layouts have none."""
    weights = cfg.models.diffusion.weights
    if weights in (EMBEDDED, RANDOM):
        return None
    local = Path(weights).expanduser()
    if local.exists():
        return str(local.resolve()) if (local / "model_index.json").is_file() else None
    return weights  # a hub id (loaded from the user's cache or the hub, as for training)


def as_pipeline(policy: DiffusionPolicy) -> StableDiffusionPipeline:
    """The policy's frozen base modules as a StableDiffusionPipeline (no safety checker: these are radiographs).
    The UNet is a copy without the LoRA layers: the pipeline gets LoRA from the exported file."""
    models = policy.models
    unet = UNet2DConditionModel.from_config(models.unet.config)
    unet.load_state_dict({k.replace(".base_layer", ""): v for k, v in models.unet.state_dict().items()
                          if "lora_" not in k})  # strict: every base tensor and nothing else
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=unet, scheduler=DDIMScheduler.from_config(models.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # the pipeline rewrites a clipping scheduler's config to clip_sample=False (right for SD's latents); the
    # shipped pixel-space model clips x̂_0 to the pixel range, so its own scheduler goes back in
    pipe.scheduler = DDIMScheduler.from_config(models.scheduler.config)
    return pipe


def export_cxrl(cfg: ExperimentConfig, checkpoint: Path, tensors: dict[str, torch.Tensor], state: dict,
                out: Path) -> dict:
    """Write the export (see the module docstring); returns what export.json holds."""
    policy = policy_from_checkpoint(cfg, tensors, state)
    out.mkdir(parents=True, exist_ok=True)
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(policy.unet, adapter_name="default"))
    lora = {k: v.detach().float().contiguous() for k, v in lora.items()}
    metadata = policy.unet.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: JSON needs a list
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=lora, unet_lora_adapter_metadata=metadata,
                                              weight_name=LORA_FILE, safe_serialization=True)
    ace_tokens = 0
    if policy.ace is not None:
        ace_tokens = policy.ace.shape[0]
        save_file({"ace": policy.ace.detach().float().contiguous()}, out / ACE_FILE,
                  metadata={"placement": "prefix of the text encoder's last hidden state, for the report and for "
                                         "the empty prompt of classifier-free guidance"})
    base = base_pipeline_source(cfg)
    if base is None:
        with quiet_diffusers():
            as_pipeline(policy).save_pretrained(out / "base")
        base = "base"
    rollout = cfg.rollout
    info = {"task": "cxrl", "base": base, "checkpoint": str(checkpoint), "iteration": state["iteration"],
            "weight_version": state["weight_version"], "ace_tokens": ace_tokens,
            "lora": {"rank": metadata["r"], "alpha": metadata["lora_alpha"], "targets": metadata["target_modules"]},
            "pixel_space": policy.models.vae is None, "image_size": cfg.data.image_size,
            "sampling": {"num_inference_steps": rollout.num_steps, "eta": rollout.eta,
                         "guidance_scale": rollout.guidance_scale},
            "config": cfg.model_dump(mode="json")}
    write_export(out, info)
    return info


# ---------------------------------------------------------------------------- using an export in diffusers


def load_ace(export_dir: Path) -> torch.Tensor | None:
    """The ACE tokens [N, d] of an export (None if it was trained without ACE)."""
    path = Path(export_dir) / ACE_FILE
    return load_file(path)["ace"] if path.is_file() else None


def ace_prompt_embeds(pipe: StableDiffusionPipeline, prompts: list[str], ace: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds) for `pipe(...)` as radrl conditions: diffusers' own text encoding
    (`encode_prompt`, padded to the tokenizer's length) of each report and of "", each with ACE in front."""
    cond, uncond = pipe.encode_prompt(list(prompts), pipe.device, 1, True, negative_prompt=[""] * len(prompts))
    if ace is None:
        return cond, uncond
    prefix = ace.to(cond.device, cond.dtype).expand(len(prompts), -1, -1)
    return torch.cat([prefix, cond], dim=1), torch.cat([prefix, uncond], dim=1)


def load_pipeline(export_dir: Path, base: str | None = None) -> StableDiffusionPipeline:
    """The export's base pipeline with its LoRA loaded and radrl's DDIM scheduler; `base` overrides export.json's."""
    export_dir = Path(export_dir)
    info = read_export(export_dir)
    base = base or info["base"]
    source = str(export_dir / base) if (export_dir / base).is_dir() else base  # the export's base/, a folder, a hub id
    extra = {"vae": None} if info["pixel_space"] else {}  # the shipped tiny model denoises pixels: no VAE
    with quiet_diffusers():
        pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False,
                                                       **extra)
    # radrl samples with DDIM on the base's scheduler config, read from its file: the pipeline's constructor sets
    # clip_sample=False, which is wrong for the pixel-space tiny model
    pipe.scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    with quiet_diffusers():
        pipe.load_lora_weights(str(export_dir), weight_name=LORA_FILE)
    return pipe


def to_unit_images(output: torch.Tensor, pixel_space: bool) -> torch.Tensor:
    """A pipeline's output (output_type="latent" for a pixel-space model, else "pt") → [B, 1, H, W] in [0, 1], as
    radrl's sampler returns images."""
    images = (output.float().clamp(-1, 1) + 1) / 2 if pixel_space else output.float()
    return images.mean(dim=1, keepdim=True)
