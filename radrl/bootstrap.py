"""`radrl bootstrap`: train every tiny model on the embedded world and write them into the package.

Stages, each seeded and timed: tokenizer → render phantoms → diagnostic classifier → posture
regressor → CLIP → decoder LM → diffusion generator → quality report. The quality report's
figures are measured on held-out data from the weights exactly as written.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from transformers import OPTForCausalLM

from radrl.config import ReportGeneratorConfig
from radrl.data.embedded import (
    EmbeddedPair,
    embedded_pairs,
    findings_from_labels,
    random_specs,
    render_specs,
)
from radrl.data.iu_reports import iu_split
from radrl.data.labeler import label_reports
from radrl.data.phantom import canonical_image
from radrl.models.classifier import (
    PAPER_CLASSES,
    DiagnosticClassifier,
    chexpert_names,
    load_tiny_classifier,
    save_classifier,
    save_operating_points,
    youden_operating_points,
    tiny_classifier,
)
from radrl.models.clip import (
    ImageReportClip,
    from_model_cfg,
    load_clip,
    tiny_clip_config,
)
from radrl.models.diffusion import DiffusionModels, load_diffusion, random_diffusion
from radrl.models.posture import PostureRegressor, alignment_step, load_posture, r_align
from radrl.models.report_lm import DecoderLM, build_decoder, tiny_decoder_config
from radrl.models.tokenizer import save_tokenizer, train_report_tokenizer
from radrl.models.weights import EMBEDDED_DIR, save_state
from radrl.progress import progress, say

QUALITY_GUIDANCE = 3.0  # classifier-free guidance of the quality samples and the sample figure
QUALITY_SAMPLE_SEED = 6
IMAGE_SIZE = 32  # the embedded world's resolution: what a 2-core CPU can train and sample in minutes


@dataclass(frozen=True)
class BootstrapPlan:
    """How much of everything to train; `quick` shrinks it for smoke tests."""

    reward_train_images: int = 4000
    reward_test_images: int = 1000
    classifier_epochs: int = 20
    posture_epochs: int = 10
    clip_epochs: int = 10
    clip_lr: float = 5e-4
    decoder_epochs: int = 3
    diffusion_steps: int = 1200
    diffusion_batch: int = 16
    quality_samples: int = 128
    sample_steps: int = 20
    postures_per_report: int = 2
    max_train_reports: int | None = None  # None = the whole IU train split

    @classmethod
    def quick(cls) -> BootstrapPlan:
        return cls(reward_train_images=256, reward_test_images=128, classifier_epochs=1, posture_epochs=1, clip_epochs=1,
                   decoder_epochs=1, diffusion_steps=20, diffusion_batch=8, quality_samples=16, sample_steps=4,
                   max_train_reports=200)


def _log(message: str, start: float) -> None:
    say(f"[{time.time() - start:7.1f}s] {message}")


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
        yield torch.from_numpy(order[i : i + batch_size])


def target_matrix(specs, names: tuple[str, ...]) -> torch.Tensor:
    """[N, C] 0/1 targets of each phantom for the given CheXpert class names."""
    return torch.tensor([[float(name in spec.findings) for name in names] for spec in specs])


def train_classifier(images, targets, plan: BootstrapPlan, start: float, seed: int) -> DiagnosticClassifier:
    """Multi-label BCE on randomly drawn phantoms."""
    torch.manual_seed(seed)  # each stage reproducible on its own
    model = tiny_classifier(resolution=IMAGE_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    for epoch in progress(range(plan.classifier_epochs), desc="classifier", unit="epoch"):
        model.train()
        for idx in _batches(len(images), 64, rng):
            loss = F.binary_cross_entropy_with_logits(model(images[idx]), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _log(f"classifier epoch {epoch + 1}/{plan.classifier_epochs}: loss {loss.item():.3f}", start)
    return model.eval()


@torch.no_grad()
def classifier_auroc(model: DiagnosticClassifier, images, targets) -> dict[str, float]:
    """Per-class AUROC (classes with both outcomes present)."""
    scores = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)])
    return {name: float(binary_auroc(scores[:, c], targets[:, c].long()))
            for c, name in enumerate(model.targets) if 0 < targets[:, c].sum() < len(targets)}


def train_posture(images, plan: BootstrapPlan, start: float, seed: int) -> PostureRegressor:
    """The paper's unsupervised loss: L2 between the de-warped image and the canonical image."""
    torch.manual_seed(seed)  # each stage reproducible on its own
    canonical = torch.from_numpy(canonical_image(IMAGE_SIZE)).view(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    model = PostureRegressor("tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    for epoch in progress(range(plan.posture_epochs), desc="posture", unit="epoch"):
        model.train()
        for idx in _batches(len(images), 64, rng):
            loss = alignment_step(model, optimizer, images[idx], canonical)
        _log(f"posture epoch {epoch + 1}/{plan.posture_epochs}: alignment L2 {loss.item():.4f}", start)
    return model.eval()


@torch.no_grad()
def posture_errors(model: PostureRegressor, images, specs) -> dict[str, float]:
    """Mean absolute error of each ψ parameter and of r_align against the renderer's truth."""
    predicted = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)])
    truth = torch.tensor(np.stack([s.posture.as_array() for s in specs]))
    errors = (predicted - truth).abs().mean(dim=0)
    result = {f"mae_{name}": float(e) for name, e in zip(("s_x", "s_y", "t_x", "t_y", "theta"), errors)}
    result["mae_r_align"] = float((r_align(predicted) - r_align(truth)).abs().mean())
    result["r_align_truth_mean"] = float(r_align(truth).mean())
    return result


def train_clip(
    images, reports: list[str], tokenizer_dir: Path, plan: BootstrapPlan, start: float, seed: int
) -> ImageReportClip:
    """Contrastive image–report training (open_clip's ClipLoss)."""
    torch.manual_seed(seed)  # each stage reproducible on its own
    tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=77)
    clip = from_model_cfg(tiny_clip_config(len(tokenizer.tokenizer), IMAGE_SIZE), tokenizer)
    tokens = tokenizer(reports)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=plan.clip_lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    for epoch in progress(range(plan.clip_epochs), desc="clip", unit="epoch"):
        clip.train()
        for idx in _batches(len(images), 64, rng):
            image_features = clip.encode_images(images[idx])
            text_features = F.normalize(clip.model.encode_text(tokens[idx]), dim=-1)
            loss = loss_fn(image_features, text_features, clip.model.logit_scale.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _log(f"clip epoch {epoch + 1}/{plan.clip_epochs}: contrastive loss {loss.item():.3f}", start)
    return clip.eval()


@torch.no_grad()
def clip_retrieval(clip: ImageReportClip, images, reports: list[str]) -> dict[str, float]:
    """Image→report retrieval among the distinct held-out reports.

    `top1`/`top5`: the exact report is retrieved. Most IU reports are normal and worded alike,
    so also `top1_same_findings`/`top5_same_findings`: a retrieved report describes the same
    set of drawn findings, with `chance_same_findings` the hit rate of a random top-1.
    """
    unique = sorted(set(reports))
    text_features = torch.cat([clip.encode_reports(unique[i : i + 256]) for i in range(0, len(unique), 256)])
    image_features = torch.cat([clip.encode_images(images[i : i + 256]) for i in range(0, len(images), 256)])
    ranking = (image_features @ text_features.T).argsort(dim=1, descending=True)
    truth = torch.tensor([unique.index(r) for r in reports])
    findings = [findings_from_labels(v) for v in label_reports(unique)]
    same = torch.tensor([[findings[j] == findings[t] for j in range(len(unique))] for t in truth.tolist()])
    retrieved_same = same.gather(1, ranking[:, :5])
    return {"top1": float((ranking[:, 0] == truth).float().mean()),
            "top5": float((ranking[:, :5] == truth[:, None]).any(dim=1).float().mean()),
            "top1_same_findings": float(retrieved_same[:, 0].float().mean()),
            "top5_same_findings": float(retrieved_same.any(dim=1).float().mean()),
            "chance_same_findings": float(same.float().mean()),
            "candidates": len(unique)}


def train_decoder(reports: list[str], tokenizer, plan: BootstrapPlan, start: float, seed: int) -> DecoderLM:
    """Language-model pretraining of the tiny OPT on report text."""
    torch.manual_seed(seed)  # each stage reproducible on its own
    lm = DecoderLM(OPTForCausalLM(tiny_decoder_config(len(tokenizer))), tokenizer)
    batch = tokenizer(reports, padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    for epoch in progress(range(plan.decoder_epochs), desc="decoder", unit="epoch"):
        lm.model.train()
        for idx in _batches(len(reports), 32, rng):
            out = lm.model(input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx], labels=labels[idx])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        _log(f"decoder epoch {epoch + 1}/{plan.decoder_epochs}: LM loss {out.loss.item():.3f}", start)
    return lm


@torch.no_grad()
def decoder_perplexity(lm: DecoderLM, reports: list[str]) -> float:
    """Token perplexity on held-out reports."""
    lm.model.eval()
    batch = lm.tokenizer(reports, padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return float(torch.exp(lm.model(**batch, labels=labels).loss))


def train_diffusion(
    pairs: list[EmbeddedPair], images, tokenizer, plan: BootstrapPlan, start: float, seed: int
) -> DiffusionModels:
    """Text-to-phantom DDPM training of UNet + text encoder, with 10% empty prompts for guidance."""
    torch.manual_seed(seed)  # each stage reproducible on its own
    models = random_diffusion("tiny", IMAGE_SIZE, tokenizer)
    tokens = tokenizer([p.report for p in pairs], padding="max_length", truncation=True, max_length=77,
                       return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    params = list(models.unet.parameters()) + list(models.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=min(100, plan.diffusion_steps))
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    models.unet.train()
    models.text_encoder.train()
    for step in progress(range(plan.diffusion_steps), desc="diffusion", unit="step"):
        idx = torch.from_numpy(rng.integers(0, len(pairs), plan.diffusion_batch))
        x0 = images[idx] * 2 - 1
        ids = torch.where(torch.rand(len(idx), 1, generator=generator) < 0.1, empty, tokens[idx])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, models.scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        noisy = models.scheduler.add_noise(x0, noise, t)
        predicted = models.unet(noisy, t, encoder_hidden_states=models.text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, plan.diffusion_steps // 20) == 0:
            _log(f"diffusion step {step + 1}/{plan.diffusion_steps}: loss {loss.item():.4f}", start)
    models.unet.eval()
    models.text_encoder.eval()
    return models


@torch.no_grad()
def sample_images(models: DiffusionModels, reports: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Plain DDIM (η = 0) sampling with classifier-free guidance, for the quality check."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(reports), *models.latent_shape), generator=generator)
    cond = models.encode_reports(reports)
    uncond = models.encode_reports([""] * len(reports))
    models.scheduler.set_timesteps(steps)
    for t in models.scheduler.timesteps:
        eps = models.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_uncond, eps_cond = eps.chunk(2)
        x = models.scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, x).prev_sample
    return models.to_images(x)


@torch.no_grad()
def diffusion_quality(models, classifier, posture, pairs: list[EmbeddedPair], real_images, plan: BootstrapPlan) -> dict:
    """Does the classifier find the prompt's findings in generated images, and how upright are they?"""
    reports = [p.report for p in pairs]
    generated = sample_images(models, reports, plan.sample_steps, QUALITY_GUIDANCE, QUALITY_SAMPLE_SEED)
    names = classifier.chexpert_names()
    truth = target_matrix([p.phantom for p in pairs], names)
    result = {"samples": len(pairs), "ddim_steps": plan.sample_steps, "guidance": QUALITY_GUIDANCE}
    for label, images in (("generated", generated), ("real_phantoms", real_images)):
        probs = classifier.probabilities(images)
        aurocs = [float(binary_auroc(probs[:, c], truth[:, c].long())) for c in range(len(names))
                  if 0 < truth[:, c].sum() < len(truth)]
        result[label] = {
            "classifier_label_accuracy": float(((probs > 0.5).float() == truth).float().mean()),
            "classifier_mean_auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
            "r_align_mean": float(r_align(posture(images)).mean()),
        }
    return result


WRITTEN = ("quality.json", "classifier.safetensors", "posture.safetensors", "clip", "decoder", "diffusion", "tokenizer")


def check_replaceable(out_dir: Path, force: bool = False) -> None:
    """Refuse to replace a folder that bootstrap did not write (it would be deleted) unless `force`."""
    out_dir = Path(out_dir)
    if force or not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if out_dir.is_dir() and all((out_dir / name).exists() for name in WRITTEN):
        return  # an earlier bootstrap's models: replaced once the new ones are written
    raise FileExistsError(f"bootstrap --out {out_dir}: the folder exists and does not hold bootstrap's models (no "
                          f"{', '.join(n for n in WRITTEN if not (out_dir / n).exists())}); it would be replaced. "
                          "Choose another folder, or pass --force to replace it")


def run_bootstrap(out_dir: Path = EMBEDDED_DIR, plan: BootstrapPlan = BootstrapPlan(), seed: int = 0,
                  force: bool = False) -> dict:
    """Train and write every tiny model, then measure the quality report from the written files. A folder at
    `out_dir` that bootstrap did not write is refused unless `force`."""
    check_replaceable(out_dir, force)
    start = time.time()
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    train_reports = iu_split("train")[: plan.max_train_reports]
    tokenizer = train_report_tokenizer([r.text for r in train_reports])
    save_tokenizer(tokenizer, staging / "tokenizer")
    _log(f"tokenizer: {len(tokenizer)} tokens from {len(train_reports)} train reports", start)

    specs = random_specs(plan.reward_train_images, seed=seed + 1)
    images = torch.from_numpy(render_specs(specs, IMAGE_SIZE))
    _log(f"rendered {len(images)} random phantoms for the reward models", start)
    classifier = train_classifier(images, target_matrix(specs, chexpert_names(PAPER_CLASSES)), plan, start, seed + 1)
    save_classifier(classifier, staging / "classifier.safetensors")
    fit_classifier_operating_points(staging, plan, seed)
    save_state(train_posture(images, plan, start, seed + 2), staging / "posture.safetensors", half=True)

    train_pairs = embedded_pairs("train", plan.postures_per_report, reports=train_reports)
    train_images = torch.from_numpy(render_specs([p.phantom for p in train_pairs], IMAGE_SIZE))
    _log(f"rendered {len(train_pairs)} train report phantoms", start)
    clip = train_clip(train_images, [p.report for p in train_pairs], staging / "tokenizer", plan, start, seed + 3)
    clip.save(staging / "clip", tiny_clip_config(len(tokenizer), IMAGE_SIZE), staging / "tokenizer")
    train_decoder([r.text for r in train_reports], tokenizer, plan, start, seed + 4).save(staging / "decoder")
    train_diffusion(train_pairs, train_images, tokenizer, plan, start, seed + 5).save(staging / "diffusion")

    quality = measure_quality(staging, plan, seed)
    quality["seconds"] = round(time.time() - start, 1)
    (staging / "quality.json").write_text(json.dumps(quality, indent=2))
    write_sample_figure(staging, plan)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)  # replace the old models only once every new one is written
    _log(f"wrote {out_dir}", start)
    return quality


def validation_specs(plan: BootstrapPlan, seed: int):
    """The random phantoms the classifier's operating points are chosen on (seeds disjoint from its training
    phantoms and from the held-out ones its quality is measured on)."""
    return random_specs(plan.reward_test_images, seed=seed + 2001)


@torch.no_grad()
def fit_classifier_operating_points(folder: Path, plan: BootstrapPlan = BootstrapPlan(), seed: int = 0) -> Path:
    """Choose the tiny classifier's operating points as torchxrayvision does (Youden's J of the sigmoid on
    validation data) and write them beside its weights (`classifier_op_threshs.json`)."""
    weights = folder / "classifier.safetensors"
    classifier = load_tiny_classifier(weights)
    specs = validation_specs(plan, seed)
    images = torch.from_numpy(render_specs(specs, IMAGE_SIZE))
    probabilities = torch.cat([torch.sigmoid(classifier(images[i:i + 256])) for i in range(0, len(images), 256)])
    targets = target_matrix(specs, classifier.chexpert_names())
    return save_operating_points(classifier, youden_operating_points(probabilities.numpy(), targets.numpy()), weights)


def held_out_specs(plan: BootstrapPlan, seed: int):
    """The random phantoms the reward models are scored on (disjoint seeds from training)."""
    return random_specs(plan.reward_test_images, seed=seed + 1001)


def measure_quality(folder: Path, plan: BootstrapPlan = BootstrapPlan(), seed: int = 0) -> dict:
    """The quality report of the models in `folder`, loaded from their files as any run would."""
    classifier = load_tiny_classifier(folder / "classifier.safetensors")
    posture = load_posture(folder / "posture.safetensors", "tiny")
    specs = held_out_specs(plan, seed)
    images = torch.from_numpy(render_specs(specs, IMAGE_SIZE))
    aurocs = classifier_auroc(classifier, images, target_matrix(specs, classifier.chexpert_names()))
    quality: dict = {"seed": seed, "plan": plan.__dict__, "image_size": IMAGE_SIZE,
                     "classifier_auroc": aurocs | {"mean": float(np.mean(list(aurocs.values())))},
                     "posture": posture_errors(posture, images, specs)}

    test_pairs = embedded_pairs("test", 1)
    test_images = torch.from_numpy(render_specs([p.phantom for p in test_pairs], IMAGE_SIZE))
    quality["clip_retrieval"] = clip_retrieval(load_clip(str(folder / "clip")), test_images, [p.report for p in test_pairs])
    decoder = build_decoder(ReportGeneratorConfig(decoder_weights=str(folder / "decoder")))
    quality["decoder_perplexity"] = decoder_perplexity(decoder, [p.report for p in test_pairs])
    chosen = test_pairs[: plan.quality_samples]
    diffusion = load_diffusion(folder / "diffusion", use_vae=False)
    quality["diffusion"] = diffusion_quality(diffusion, classifier, posture, chosen, test_images[: len(chosen)], plan)
    return quality


def write_sample_figure(folder: Path, plan: BootstrapPlan = BootstrapPlan(), count: int = 8) -> Path:
    """samples.png: held-out reports, their phantom, and the diffusion model's image for each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in embedded_pairs("test", 1) if p.phantom.findings][:count]
    real = render_specs([p.phantom for p in pairs], IMAGE_SIZE, processes=1)
    generated = sample_images(load_diffusion(folder / "diffusion", use_vae=False), [p.report for p in pairs],
                              plan.sample_steps, QUALITY_GUIDANCE, QUALITY_SAMPLE_SEED)
    figure, axes = plt.subplots(2, len(pairs), figsize=(2 * len(pairs), 4.6))
    for i, pair in enumerate(pairs):
        axes[0, i].imshow(real[i, 0], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title("\n".join(sorted(pair.phantom.findings)), fontsize=6)
        axes[1, i].imshow(generated[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("phantom", fontsize=8)
    axes[1, 0].set_ylabel("generated", fontsize=8)
    figure.suptitle("held-out IU reports: rendered phantom vs tiny diffusion model (DDIM, guidance 3)", fontsize=9)
    path = folder / "samples.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
