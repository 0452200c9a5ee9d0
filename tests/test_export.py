"""`radrl export` and `radrl sample`: a trained run loads in diffusers / PEFT and gives radrl's own images and
reports; the README's loading snippet runs as printed."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel
from typer.testing import CliRunner

from radrl.cli import app
from radrl.eval.rrg_eval import load_report_policy
from radrl.eval.run import resolve_checkpoint
from radrl.export import export_run
from radrl.export.cxrl import ace_prompt_embeds, load_ace, load_pipeline, policy_from_checkpoint, to_unit_images
from radrl.export.rrg import load_report_generator
from radrl.export.sample import held_out
from radrl.checkpoints import load_checkpoint
from radrl.models.diffusion import DiffusionModels, latent_scheduler, tiny_text_encoder_config, tiny_unet_config
from radrl.models.weights import embedded_path
from radrl.orchestration.run import run_training
from radrl.rollout.sampler import sample_images

from test_eval_run import CXRL, RRG, config

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
# a large step, so that one iteration moves LoRA and ACE far enough for "the export matters" to be checkable
TRAINED = {"learner.iterations": 1, "learner.lr": 0.05}


def tiny_latent_models(latent_size: int = 16) -> DiffusionModels:
    """A tiny Stable-Diffusion-layout model that denoises VAE latents (4 × S × S → 2S px images)."""
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_path("tokenizer")))
    text_encoder = CLIPTextModel(tiny_text_encoder_config(len(tokenizer)))
    unet = UNet2DConditionModel(**{**tiny_unet_config(latent_size, text_encoder.config.hidden_size),
                                   "in_channels": 4, "out_channels": 4})
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, sample_size=2 * latent_size)
    return DiffusionModels(unet, text_encoder, tokenizer, latent_scheduler(), vae)


def latent_sd(folder: Path) -> Path:
    """tiny_latent_models() in the SD 1.x folder layout (32 px images)."""
    tiny_latent_models().save(folder)
    return folder


def pipeline_images(export: Path, reports: list[str], noise: torch.Tensor, steps: int, guidance: float,
                    lora: bool = True) -> torch.Tensor:
    info = json.loads((export / "export.json").read_text())
    pipe = load_pipeline(export)
    pipe.set_progress_bar_config(disable=True)
    if not lora:
        pipe.disable_lora()
    cond, uncond = ace_prompt_embeds(pipe, reports, load_ace(export) if lora else None)
    output = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), num_inference_steps=steps,
                  guidance_scale=guidance, eta=0.0, output_type="latent" if info["pixel_space"] else "pt").images
    return to_unit_images(output, info["pixel_space"])


def test_cxrl_export_on_a_latent_sd_model_gives_radrls_images_in_diffusers(tmp_path):
    sd = latent_sd(tmp_path / "sd")
    cfg = config(CXRL, tmp_path / "run", **TRAINED, **{"models.diffusion.weights": str(sd),
                                                       "models.diffusion.use_vae": True})
    run_training(cfg)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    export = tmp_path / "run" / "export"
    info = json.loads((export / "export.json").read_text())
    assert info["iteration"] == 1 and info["base"] == "base" and not info["pixel_space"]  # a bare radrl layout
    assert (export / "pytorch_lora_weights.safetensors").is_file() and load_ace(export).shape == (cfg.learner.ace_tokens, 128)

    tensors, state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    policy = policy_from_checkpoint(cfg, tensors, state)
    reports = ["Heart size normal. Lungs clear.", "Small left pleural effusion."]
    noise = torch.randn(2, *policy.models.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = sample_images(policy, reports, 4, 0.0, cfg.rollout.guidance_scale, noise, torch.Generator())
    theirs = pipeline_images(export, reports, noise, 4, cfg.rollout.guidance_scale)
    assert ours.shape == theirs.shape == (2, 1, 32, 32)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)  # same noise, DDIM η = 0: the same images
    base = pipeline_images(export, reports, noise, 4, cfg.rollout.guidance_scale, lora=False)
    assert (base - ours).abs().max() > 1e-2  # ... and the LoRA + ACE are what makes them the policy's
    with policy.anchor():
        anchor = sample_images(policy, reports, 4, 0.0, cfg.rollout.guidance_scale, noise, torch.Generator())
    torch.testing.assert_close(base, anchor, atol=1e-5, rtol=0)  # LoRA off, no ACE: radrl's anchor


def test_readme_snippet_loads_the_default_runs_export_as_printed(tmp_path, monkeypatch):
    """`radrl train` → `radrl export runs/cxrl_tiny` → the README's diffusers code, verbatim, in the run's folder."""
    monkeypatch.chdir(tmp_path)
    run_training(config(CXRL, Path("runs/cxrl_tiny"), **TRAINED))
    assert CliRunner().invoke(app, ["export", "runs/cxrl_tiny"]).exit_code == 0
    text = README.read_text()
    snippet = re.search(r"<!-- export-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert snippet, "README lost its marked diffusers snippet"
    namespace = {}
    exec(compile(snippet.group(1), "README snippet", "exec"), namespace)  # noqa: S102 - the README's own code
    images = namespace["images"]
    assert images.shape == (1, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    card = Path("runs/cxrl_tiny/export/README.md").read_text()
    assert "load_lora_weights" in card and "## Held-out results of the run" in card and "| r_align" in card


def test_rrg_export_reloads_as_a_peft_adapter_with_the_same_reports(tmp_path):
    run = tmp_path / "rrg"
    # with the disease condition, which the export must carry and the loader must add to every report token
    cfg = config(RRG, run, **{"learner.lr": 0.05, "models.report_generator.disease_condition": "every_token"})
    run_training(cfg)
    out, info = export_run(run, merged=True)
    assert info["stage"] == "rl" and info["adapter"]
    assert "disease_condition: every_token" in (out / "README.md").read_text()
    assert (out / "decoder_adapter" / "adapter_config.json").is_file() and (out / "decoder_merged").is_dir()
    policy = load_report_policy(cfg, resolve_checkpoint(run)).eval()
    pairs = held_out(cfg, 6)
    images = torch.from_numpy(pairs.images)
    loaded, merged = load_report_generator(out), load_report_generator(out, merged=True)
    with torch.no_grad():
        nll = policy.generator.report_nll(images, list(pairs.reports))
        with policy.reference():
            reference = policy.generator.report_nll(images, list(pairs.reports))
        assert (nll - reference).abs().max() > 1e-3  # the RL LoRA changes the model ...
        torch.testing.assert_close(loaded.report_nll(images, list(pairs.reports)), nll, atol=1e-5, rtol=0)  # ... kept
        torch.testing.assert_close(merged.report_nll(images, list(pairs.reports)), nll, atol=1e-4, rtol=0)
        assert loaded.greedy_reports(images) == policy.generator.greedy_reports(images)
        assert torch.count_nonzero(loaded.disease_condition) > 0  # trained, and carried by visual.safetensors
    export_run(run, tmp_path / "plain")
    assert not (tmp_path / "plain" / "decoder_merged").exists()
    with pytest.raises(ValueError, match="no merged decoder"):
        load_report_generator(tmp_path / "plain", merged=True)


def test_sample_writes_pngs_and_a_contact_sheet_and_refuses_bad_input(tmp_path):
    run = tmp_path / "cxrl"
    run_training(config(CXRL, run, **{"learner.iterations": 1}))
    runner = CliRunner()
    result = runner.invoke(app, ["sample", str(run), "--anchor", "--report", "Small left pleural effusion.",
                                 "--held-out", "2"])
    assert result.exit_code == 0, result.output
    samples = run / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == [
        "000_anchor.png", "000_policy.png", "001_anchor.png", "001_policy.png", "002_anchor.png", "002_policy.png",
        "contact_sheet.png"]
    assert Image.open(samples / "000_policy.png").size == (32, 32)
    assert (samples / "reports.txt").read_text().startswith("000\tSmall left pleural effusion.")
    again = runner.invoke(app, ["sample", str(run), "--report", "Small left pleural effusion.", "--out",
                                str(tmp_path / "again")])
    assert again.exit_code == 0  # seeded: the same image again (alone in its batch this time, and CPU kernels
    # may round differently by batch size: at most one grey level apart)
    alone, batched = (np.asarray(Image.open(p), dtype=np.int16) for p in (tmp_path / "again" / "000_policy.png",
                                                                          samples / "000_policy.png"))
    assert np.abs(alone - batched).max() <= 1 and (alone != batched).mean() < 0.01
    by_id = runner.invoke(app, ["sample", str(run), "--held-out-id", "1", "--out", str(tmp_path / "by_id")])
    assert by_id.exit_code == 0, by_id.output
    from radrl.data.pairs import image_report_pairs

    second = image_report_pairs(config(CXRL, run).data, "test").reports[1]  # position 1 of the held-out set
    assert (tmp_path / "by_id" / "reports.txt").read_text() == f"000\t{second}\n"
    beyond = runner.invoke(app, ["sample", str(run), "--held-out-id", "100000"])
    assert beyond.exit_code == 1 and "the held-out set has" in beyond.output
    empty = runner.invoke(app, ["sample", str(run), "--report", " "])
    assert empty.exit_code == 1 and "empty" in empty.output
    missing = runner.invoke(app, ["sample", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "neither a checkpoint folder" in missing.output

    rrg = tmp_path / "rrg"
    run_training(config(RRG, rrg))
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((torch.rand(48, 48) * 255).byte().numpy(), mode="L").save(images / "a.png")
    result = runner.invoke(app, ["sample", str(rrg), "--image", str(images)])
    assert result.exit_code == 0, result.output
    assert "## 000 a.png" in (rrg / "samples" / "reports.md").read_text()
    assert (rrg / "samples" / "contact_sheet.png").is_file()
    (images / "b.png").write_bytes(b"not a png")
    bad = runner.invoke(app, ["sample", str(rrg), "--image", str(images / "b.png")])
    assert bad.exit_code == 1 and "cannot read image" in bad.output and "b.png" in bad.output
