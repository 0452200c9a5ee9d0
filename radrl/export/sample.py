"""`radrl sample`: a run (the checkpoint it kept, else its latest) or an export → images for reports (CXRL) or reports for images
(LM-RRG), as PNG/text files and a contact sheet.

A CXRL run samples with radrl's own sampler and the evaluation's seeding, so `--anchor` shows the base model's
image from the same noise; a CXRL export samples through diffusers (the pipeline, its LoRA and the ACE prefix).
"""

from __future__ import annotations

import json
import textwrap
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from radrl.config import ExperimentConfig
from radrl.eval.figures import image_grid_figure
from radrl.export import read_export
from radrl.progress import progress

SHEET = "contact_sheet.png"


def held_out(cfg: ExperimentConfig, count: int):
    """The first `count` held-out pairs (unseen test texts) of the config's data."""
    from radrl.data.pairs import image_report_pairs

    return image_report_pairs(cfg.data, "test", count)


def source_config(source: Path) -> tuple[ExperimentConfig, dict | None, Path | None]:
    """(training config, export.json or None, checkpoint or None) of a run folder, checkpoint folder or export."""
    from radrl.eval.run import resolve_checkpoint

    info = read_export(source, required=False)
    if info is not None:
        return ExperimentConfig.model_validate(info["config"]), info, None
    checkpoint = resolve_checkpoint(source)
    state = json.loads((checkpoint / "state.json").read_text())
    return ExperimentConfig.model_validate(state["config"]), None, checkpoint


def save_png(image: torch.Tensor, path: Path) -> None:
    """[1, H, W] in [0, 1] → 8-bit grayscale PNG."""
    Image.fromarray((image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8), mode="L").save(path)


def sample_cxrl(cfg: ExperimentConfig, info: dict | None, checkpoint: Path | None, source: Path, reports: list[str],
                out: Path, anchor: bool, seed: int, eta: float | None) -> dict[str, torch.Tensor]:
    """One image per report from the policy (and the anchor): name → [N, 1, H, W]; PNGs written to `out`."""
    rollout = cfg.rollout
    eta = rollout.eta if eta is None else eta
    images = {}
    if info is None:
        from diffusers.utils.torch_utils import randn_tensor

        from radrl.eval.cxrl_eval import evaluation_worker
        from radrl.rollout.sampler import sample_images
        from radrl.rollout.worker import generators

        policy = evaluation_worker(cfg, checkpoint).policy
        for model in (("anchor",) if anchor else ()) + ("policy",):
            parts = []
            for start in progress(range(0, len(reports), rollout.batch_size), desc=f"sampling {model}",
                                  unit="batch"):
                batch = reports[start:start + rollout.batch_size]
                rows = [seed * 1_000_003 + start + i for i in range(len(batch))]  # a report's noise: its position
                noise = randn_tensor((len(batch), *policy.models.latent_shape), generator=generators(rows, "cpu"))
                with policy.anchor() if model == "anchor" else nullcontext():
                    parts.append(sample_images(policy, batch, rollout.num_steps, eta, rollout.guidance_scale, noise,
                                               generators([r + 1 for r in rows], "cpu")))
            images[model] = torch.cat(parts).cpu()
    else:
        from radrl.export.cxrl import ace_prompt_embeds, load_ace, load_pipeline, to_unit_images

        pipe = load_pipeline(source)
        pipe.set_progress_bar_config(disable=True)
        ace, pixel, size = load_ace(source), info["pixel_space"], info["image_size"]
        shape = (1, 1, size, size) if pixel else (1, 4, size // 8, size // 8)
        for model in (("anchor",) if anchor else ()) + ("policy",):
            if model == "anchor":
                pipe.disable_lora()
            else:
                pipe.enable_lora()
            parts = []
            for i, report in enumerate(progress(reports, desc=f"sampling {model} (diffusers)", unit="report")):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
                cond, uncond = ace_prompt_embeds(pipe, [report], None if model == "anchor" else ace)
                output = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond,
                              latents=torch.randn(shape, generator=generator), generator=generator,
                              num_inference_steps=rollout.num_steps, guidance_scale=rollout.guidance_scale, eta=eta,
                              output_type="latent" if pixel else "pt").images
                parts.append(to_unit_images(output, pixel))
            images[model] = torch.cat(parts)
    for model, batch in images.items():
        for i, image in enumerate(batch):
            save_png(image, out / f"{i:03d}_{model}.png")
    return images


def sample_rrg(cfg: ExperimentConfig, info: dict | None, checkpoint: Path | None, source: Path,
               images: torch.Tensor) -> list[str]:
    """Greedy reports of images [N, 1, S, S] from the run's policy or the export's generator."""
    if info is None:
        from radrl.eval.rrg_eval import load_report_policy

        generator = load_report_policy(cfg, checkpoint).generator.eval()
    else:
        from radrl.export.rrg import load_report_generator

        generator = load_report_generator(source)
    texts = []
    with torch.no_grad():
        for start in progress(range(0, len(images), 16), desc="writing reports", unit="batch"):
            texts += generator.greedy_reports(images[start:start + 16])
    return texts


def load_images(paths: list[Path], size: int) -> tuple[torch.Tensor, list[str]]:
    """Image files (or folders of them) → [N, 1, size, size] in [0, 1] and their names; a clear error for a bad one."""
    from radrl.data.image_datasets import IMAGE_SUFFIXES, read_image

    files = []
    for path in paths:
        files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no PNG/JPEG images in {', '.join(map(str, paths))}")
    return torch.stack([read_image(file, size) for file in files]), [f.name for f in files]


def held_out_by_index(cfg: ExperimentConfig, indexes: list[int]):
    """The held-out pairs at `indexes` (positions in the whole held-out set, in its order)."""
    pairs = held_out(cfg, None)
    wrong = [i for i in indexes if not 0 <= i < len(pairs)]
    if wrong:
        raise ValueError(f"--held-out-id {wrong}: the held-out set has {len(pairs)} pairs (0 … {len(pairs) - 1})")
    return pairs.take(indexes)


def run_sample(source: Path, out: Path, reports: list[str], images: list[Path], held_out_count: int,
               anchor: bool = False, seed: int = 0, eta: float | None = None, held_out_ids: list[int] = ()) -> Path:
    """Sample (see the module docstring); writes PNGs or reports.md and the contact sheet into `out`."""
    import matplotlib.pyplot as plt

    cfg, info, checkpoint = source_config(Path(source))
    out.mkdir(parents=True, exist_ok=True)
    chosen = held_out_by_index(cfg, list(held_out_ids)) if held_out_ids else None
    if cfg.task == "cxrl":
        empty = [i for i, r in enumerate(reports) if not r.strip()]
        if empty:
            raise ValueError(f"report(s) {empty} are empty: give report text (or --held-out N for held-out reports)")
        reports = list(reports) + (list(chosen.reports) if chosen is not None else [])
        if held_out_count or not reports:  # nothing given: 8 held-out reports
            reports += list(held_out(cfg, held_out_count or 8).reports)
        rows = sample_cxrl(cfg, info, checkpoint, Path(source), reports, out, anchor, seed, eta)
        (out / "reports.txt").write_text("\n".join(f"{i:03d}\t{r}" for i, r in enumerate(reports)) + "\n")
        figure = image_grid_figure(reports, rows, f"radrl sample: {source}")
    else:
        if images:
            pixels, names = load_images(images, cfg.data.image_size)
            references = None
        else:
            ids = list(held_out_ids) if chosen is not None else list(range(held_out_count or 8))
            pairs = chosen if chosen is not None else held_out(cfg, held_out_count or 8)
            pixels, names, references = torch.from_numpy(pairs.images), \
                [f"held-out {i}" for i in ids[:len(pairs)]], list(pairs.reports)
        texts = sample_rrg(cfg, info, checkpoint, Path(source), pixels)
        lines = []
        for i, (name, text) in enumerate(zip(names, texts)):
            lines += [f"## {i:03d} {name}", "", f"generated: {text}"]
            lines += [f"reference: {references[i]}"] if references else []
            lines.append("")
        (out / "reports.md").write_text("\n".join(lines))
        figure = report_sheet(pixels, texts, references, str(source))
    figure.savefig(out / SHEET, dpi=110)
    plt.close(figure)
    return out / SHEET


def report_sheet(images: torch.Tensor, texts: list[str], references: list[str] | None, title: str):
    """Each image with its generated report (and the reference) beside it."""
    import matplotlib.pyplot as plt

    n = len(texts)
    figure, axes = plt.subplots(n, 2, figsize=(7.5, 1.6 * n), squeeze=False,
                                gridspec_kw={"width_ratios": [1, 3.5]})
    for i in range(n):
        axes[i][0].imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[i][0].axis("off")
        text = "generated: " + textwrap.fill(textwrap.shorten(texts[i], 300), 80)
        if references:
            text += "\nreference: " + textwrap.fill(textwrap.shorten(references[i], 300), 80)
        axes[i][1].text(0, 0.5, text, fontsize=6, va="center", family="monospace")
        axes[i][1].axis("off")
    figure.suptitle(f"radrl sample: {title}", fontsize=9)
    figure.tight_layout()
    return figure
