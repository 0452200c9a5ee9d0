"""`radrl export`: a trained run in the formats its users load elsewhere (diffusers + ACE for CXRL, transformers +
PEFT for LM-RRG), with a model card; and `radrl sample`, which turns a run or an export into images or reports."""

from __future__ import annotations

import json
from pathlib import Path

from radrl.checkpoints import load_checkpoint
from radrl.config import ExperimentConfig

CARD = "README.md"
EXPORT_FILE = "export.json"  # what was exported, from which run, with its training config


def export_run(path: Path, out: Path | None = None, merged: bool = False) -> tuple[Path, dict]:
    """Export a run folder's kept checkpoint, else its latest (or the checkpoint folder given), to `out` (default
    <run>/export); returns (out, what export.json holds)."""
    from radrl.eval.run import resolve_checkpoint

    checkpoint = resolve_checkpoint(Path(path))
    tensors, state = load_checkpoint(checkpoint)
    cfg = ExperimentConfig.model_validate(state["config"])
    run_dir = checkpoint.parent.parent
    out = Path(out) if out else run_dir / "export"
    if cfg.task == "cxrl":
        from radrl.export.cxrl import export_cxrl

        info = export_cxrl(cfg, checkpoint, tensors, state, out)
    else:
        from radrl.eval.rrg_eval import load_report_policy
        from radrl.export.rrg import export_rrg

        info = export_rrg(cfg, load_report_policy(cfg, checkpoint), checkpoint, state, out, merged)
    (out / CARD).write_text(model_card(info, out, run_dir))
    return out, info


def held_out_results(run_dir: Path) -> str:
    """The run's end-of-run table (results.md), if it finished."""
    results = run_dir / "results.md"
    return results.read_text().strip() if results.is_file() else "The run has no results.md (it did not finish)."


def model_card(info: dict, out: Path, run_dir: Path) -> str:
    """README.md of an export: what it is, where it came from, how well it did, how to load it."""
    cfg = info["config"]
    source = f"`{info['checkpoint']}` (iteration {info['iteration']})"
    if info["task"] == "cxrl":
        model = cfg["models"]["diffusion"]["weights"]
        base = info["base"]
        sampling = info["sampling"]
        pixel = info["pixel_space"]
        size = info["image_size"]
        base_line = ("`base/` in this folder (the shipped tiny model: it denoises 1 × "
                     f"{size} × {size} pixels, no VAE)" if base == "base" else f"`{base}`")
        load = f'"{out}/base"' if base == "base" else f'"{base}"'
        latents = f"torch.randn(1, 1, {size}, {size})" if pixel else f"torch.randn(1, 4, {size // 8}, {size // 8})"
        body = f"""# CXRL policy: LoRA + ACE for a Stable Diffusion 1.x pipeline

Report → chest X-ray, fine-tuned with DDPO by radrl from {source}.

- Base model: {base_line} (training config's `models.diffusion.weights`: `{model}`).
- `pytorch_lora_weights.safetensors`: UNet LoRA in diffusers' format (rank {info['lora']['rank']}, alpha
  {info['lora']['alpha']}, on {', '.join(info['lora']['targets'])}), written by `save_lora_weights`.
- `ace.safetensors`: {info['ace_tokens']} adaptive condition embeddings ("ace", {info['ace_tokens']} × d). They are
  placed in front of the text encoder's output, for the report and for the empty prompt of classifier-free
  guidance; `radrl.export.cxrl.ace_prompt_embeds` builds both.
- Sampled in training with {sampling['num_inference_steps']} DDIM steps, η = {sampling['eta']}, guidance
  {sampling['guidance_scale']}.

## Load it in diffusers

```python
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from radrl.export.cxrl import ace_prompt_embeds, load_ace, to_unit_images

pipe = StableDiffusionPipeline.from_pretrained({load}, safety_checker=None{', vae=None' if pixel else ''})
pipe.scheduler = DDIMScheduler.from_pretrained({load}, subfolder="scheduler")  # radrl samples with DDIM
pipe.load_lora_weights("{out}")
cond, uncond = ace_prompt_embeds(pipe, ["Small left pleural effusion."], load_ace("{out}"))
output = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents={latents},
              num_inference_steps={sampling['num_inference_steps']}, guidance_scale={sampling['guidance_scale']},
              eta={sampling['eta']}, output_type="{'latent' if pixel else 'pt'}").images
images = to_unit_images(output, pixel_space={pixel})  # [1, 1, {size}, {size}] in [0, 1]
```

`radrl.export.cxrl.load_pipeline("{out}")` does the first three lines. `pipe.disable_lora()` and
`pipe.encode_prompt` without ACE give the anchor (the base model).
"""
    else:
        adapter = ("`decoder_adapter/`: the CQRL LoRA as a PEFT adapter on `decoder/` (the supervised decoder)."
                   if info["adapter"] else "No adapter: a supervised-stage checkpoint.")
        condition = ("" if info["config"]["models"]["report_generator"].get("disease_condition", "off") == "off" else
                     " This model was trained with `disease_condition: every_token`: each report token's input\n"
                     "embedding also gets the disease condition (the prompt tensor's last row), which\n"
                     "`generator.generate` adds; a bare decoder without it writes other reports.")
        body = f"""# LM-RRG report generator: decoder LM + PEFT adapter + visual extractor

Chest X-ray → report, trained by radrl from {source} (stage: {info['stage']}).

- `decoder/`: the decoder LM (transformers `save_pretrained`, with its tokenizer).
- {adapter}
- {'`decoder_merged/`: the adapter merged into the decoder.' if info['merged'] else 'Merged decoder: export with `--merged`.'}
- `visual.safetensors`: the CLIP image tower, region blocks, VTrans, projection, disease head, tokens and condition.

## Load it

```python
from radrl.export.rrg import load_report_generator
generator = load_report_generator("{out}")  # merged=True: decoder_merged/ instead of decoder/ + adapter
reports = generator.greedy_reports(images)  # images: [B, 1, S, S] in [0, 1]
```

The decoder alone loads with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{out}/decoder"),
"{out}/decoder_adapter")`; its prompts (visual tokens) come from the extractor.{condition}
"""
    return body + f"\n## Held-out results of the run\n\n{held_out_results(run_dir)}\n"


def read_export(folder: Path, required: bool = True) -> dict | None:
    """export.json of an export folder; a folder that is not one: an error, or None when not `required`."""
    path = Path(folder) / EXPORT_FILE
    if path.is_file():
        return json.loads(path.read_text())
    if required:
        raise FileNotFoundError(f"{folder} is not a radrl export (no {EXPORT_FILE}); write one with `radrl export RUN`")
    return None


def write_export(out: Path, info: dict) -> None:
    (Path(out) / EXPORT_FILE).write_text(json.dumps(info, indent=1))
