"""A trained LM-RRG model as transformers/PEFT load it, and the loader that puts the report generator back together.

    DIR/decoder/            the decoder LM the RL LoRA was trained on (the supervised one), save_pretrained
    DIR/decoder_adapter/    the CQRL LoRA as a PEFT adapter (PeftModel.from_pretrained(decoder, DIR/decoder_adapter))
    DIR/decoder_merged/     with --merged: the decoder with the LoRA merged in, for plain transformers
    DIR/visual.safetensors  everything else of the generator: CLIP image tower, region blocks, VTrans, projection,
                            disease head and tokens, operating points
    DIR/export.json, DIR/README.md
A supervised-stage checkpoint has no adapter: its decoder is the supervised one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from radrl.config import RANDOM, ExperimentConfig
from radrl.export import read_export, write_export
from radrl.models.report_generator import ReportGenerator, ReportPolicy, build_report_generator

VISUAL_FILE = "visual.safetensors"


def export_rrg(cfg: ExperimentConfig, policy: ReportPolicy, checkpoint: Path, state: dict, out: Path,
               merged: bool = False) -> dict:
    """Write the export (see the module docstring) of a loaded report policy; returns what export.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    generator = policy.generator
    decoder = generator.decoder
    adapter = policy.stage == "rl"
    if isinstance(decoder, PeftModel):
        if adapter:
            decoder.save_pretrained(out / "decoder_adapter")
            base = copy.deepcopy(decoder).unload()
        else:  # a supervised-stage LoRA: part of the supervised decoder
            base = copy.deepcopy(decoder).merge_and_unload()
    else:
        base = decoder
    base.save_pretrained(out / "decoder")
    generator.tokenizer.save_pretrained(str(out / "decoder"))
    if merged and adapter:
        copy.deepcopy(decoder).merge_and_unload().save_pretrained(out / "decoder_merged")
        generator.tokenizer.save_pretrained(str(out / "decoder_merged"))
    # the state dict, and the buffers computed at build time (region text embeddings of the frozen CLIP): the
    # loader builds a random CLIP, so what was derived from the real one must travel too
    tensors = generator.state_dict() | dict(generator.named_buffers())
    visual = {k: v.detach().contiguous() for k, v in tensors.items() if not k.startswith("decoder.")}
    save_file(visual, out / VISUAL_FILE)
    info = {"task": "rrg", "checkpoint": str(checkpoint), "iteration": state["iteration"],
            "stage": policy.stage, "adapter": adapter, "merged": merged and adapter,
            "config": cfg.model_dump(mode="json")}
    write_export(out, info)
    return info


def load_report_generator(export_dir: Path, merged: bool = False, device: str = "cpu") -> ReportGenerator:
    """The exported report generator, ready for `greedy_reports(images)`: the decoder from DIR/decoder plus the
    PEFT adapter (or DIR/decoder_merged with `merged`), the rest from visual.safetensors."""
    export_dir = Path(export_dir)
    info = read_export(export_dir)
    if info["task"] != "rrg":
        raise ValueError(f"{export_dir} is a {info['task']} export, not an LM-RRG one")
    if merged and not info["merged"]:
        raise ValueError(f"{export_dir} has no merged decoder: export it with --merged")
    cfg = ExperimentConfig.model_validate(info["config"])
    decoder = export_dir / ("decoder_merged" if merged else "decoder")
    models = cfg.models.model_copy(update={
        "clip": cfg.models.clip.model_copy(update={"weights": RANDOM}),  # its tensors come from visual.safetensors
        "report_generator": cfg.models.report_generator.model_copy(update={"decoder_weights": str(decoder)})})
    generator = build_report_generator(cfg.model_copy(update={"models": models}))
    if info["adapter"] and not merged:
        generator.decoder = PeftModel.from_pretrained(generator.decoder, str(export_dir / "decoder_adapter"))
    visual = load_file(export_dir / VISUAL_FILE)
    buffers = dict(generator.named_buffers())
    derived = {k: v for k, v in visual.items() if k in buffers and k not in generator.state_dict()}
    missing, unexpected = generator.load_state_dict({k: v for k, v in visual.items() if k not in derived},
                                                    strict=False)
    with torch.no_grad():
        for name, value in derived.items():
            buffers[name].copy_(value)
    missing = [k for k in missing if not k.startswith("decoder.")]
    if missing or unexpected:
        raise ValueError(f"{export_dir / VISUAL_FILE} does not match the exported config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return generator.to(device).eval()
