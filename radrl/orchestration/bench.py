"""`radrl bench`: where a CXRL iteration's time goes and what the distribution costs, measured in one run.

Every setting runs the same driver loop (`CXRLTrainer.train_step`) on the same config, seeds
and models for `warmup` + `iterations` iterations and keeps the measured ones:

    in-process     --local: every role in this process (the baseline)
    ray            the same work on Ray actors, one rollout worker
    ray-1-thread   one rollout worker with one CPU (one torch thread)
    ray-2-workers  two rollout workers with one CPU each, half the batch each (same images per iteration)
    ray-anchor-cache   anchor scores cached per (report, x_T seed) and precomputed (steady state)
    ray-overlap    iteration k+1 sampled while k is scored and trained (one version stale)

From these: the Ray/in-process throughput ratio, the 2-vs-1 worker sampling speed-up, the stage
breakdown (sampling split into policy and anchor, each reward, update, broadcast, logging,
idle = the rest of the iteration's wall time), broadcast bytes (adapter vs the whole UNet) and
latency, and the anchor's share of rollout time. `--gpu` adds the real-size sampler comparison
(`gpu_sampler_benchmark`).
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from radrl.config import ExperimentConfig, apply_overrides
from radrl.orchestration.actors import start_roles
from radrl.orchestration.driver import CXRLTrainer
from radrl.orchestration.tracking import TOTAL_KEY

log = logging.getLogger("radrl")

SETTINGS = {
    "in-process": ["orchestration.local=true"],
    "ray": [],
    "ray-1-thread": ["rollout.resources.num_cpus=1"],
    "ray-2-workers": ["rollout.num_workers=2", "rollout.resources.num_cpus=1"],
    # a pool of 8 training reports × 4 x_T seeds, anchor scores precomputed: the steady state of a cached run
    "ray-anchor-cache": ["data.n_train=8", "rollout.noise_seeds_per_report=4", "rollout.anchor_cache=true",
                         "rollout.precompute_anchor=true"],
    "ray-overlap": ["orchestration.overlap=true", "orchestration.max_staleness=1"],
}
DRIVER_STAGES = ("sample", "score", "update", "broadcast", "logging")


def setting_config(base: ExperimentConfig, setting: str, run_dir: Path) -> ExperimentConfig:
    """The base config under one setting; two workers take half the batch each, so an iteration's work is equal."""
    overrides = [*SETTINGS[setting], f"logging.run_dir={run_dir / setting}", "orchestration.dashboard=false"]
    if setting == "ray-2-workers":
        overrides.append(f"rollout.batch_size={base.rollout.batch_size // 2}")
    return ExperimentConfig.model_validate(apply_overrides(base.model_dump(mode="json"), overrides))


def measure(cfg: ExperimentConfig, warmup: int, iterations: int) -> dict:
    """Run warmup + iterations driver iterations; per-iteration seconds per stage and images/s of the measured ones."""
    roles = start_roles(cfg)
    try:
        trainer = CXRLTrainer(cfg, roles)
        if cfg.rollout.precompute_anchor:
            trainer.precompute_anchor()
        for _ in range(warmup):
            trainer.train_step()
        seconds, sampled, start = defaultdict(float), 0.0, time.perf_counter()
        for _ in range(iterations):
            scalars = trainer.train_step()
            logged = time.perf_counter()
            trainer.tracker.log_scalars(trainer.iteration, scalars)
            roles.cluster.record(trainer.iteration, int(scalars["rollout/images"]), scalars[TOTAL_KEY], scalars)
            seconds["logging"] += time.perf_counter() - logged
            for key, value in scalars.items():
                if key.startswith("timing/"):
                    seconds[key.removeprefix("timing/")] += value
            sampled += scalars["rollout/images"]  # policy and anchor images
        wall = time.perf_counter() - start
        trained = trainer.per_iteration * iterations  # policy images: the trajectories the learner trains on
        broadcast_bytes = scalars["broadcast/bytes"]
    finally:
        roles.cluster.shutdown()
    stages = {k: v / iterations for k, v in seconds.items() if k != "iteration"}
    iteration = wall / iterations
    stages["idle"] = iteration - sum(stages[s] for s in DRIVER_STAGES)
    sampled = sum(stages.get(f"rollout_{who}", 0.0) for who in ("policy", "anchor"))
    return {"images_per_s": trained / wall, "iteration_s": iteration, "stages_s": stages,
            "sample_images_per_s": sampled / iterations / stages["sample"], "broadcast_bytes": broadcast_bytes,
            "anchor_share_of_rollout": stages.get("rollout_anchor", 0.0) / sampled if sampled else 0.0}


def unet_bytes(cfg: ExperimentConfig) -> int:
    """Bytes of the whole UNet (what broadcasting full weights would send), adapters excluded."""
    from radrl.models.diffusion import build_diffusion

    unet = build_diffusion(cfg.models.diffusion, cfg.data.image_size).unet
    return sum(p.numel() * p.element_size() for p in unet.parameters())


def run_bench(cfg: ExperimentConfig, warmup: int = 1, iterations: int = 3,
              settings: tuple[str, ...] = tuple(SETTINGS)) -> dict:
    """Measure every setting and derive the figures (a JSON-able report)."""
    if cfg.task != "cxrl":
        raise ValueError("radrl bench measures the CXRL loop; give a task: cxrl config")
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="radrl-bench-") as scratch:
        for setting in settings:
            log.info("bench: %s (%d + %d iterations)", setting, warmup, iterations)
            results[setting] = measure(setting_config(cfg, setting, Path(scratch)), warmup, iterations)
            log.info("  %.2f images/s, %.1f s per iteration", results[setting]["images_per_s"],
                     results[setting]["iteration_s"])
    report = {"device": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
              "torch": torch.__version__, "config": {"batch": cfg.rollout.batch_size, "steps": cfg.rollout.num_steps,
                                                      "image_size": cfg.data.image_size},
              "warmup": warmup, "iterations": iterations, "settings": results,
              "unet_bytes": unet_bytes(cfg), "figures": figures(results)}
    report["figures"]["broadcast_share_of_unet"] = results[settings[0]]["broadcast_bytes"] / report["unet_bytes"]
    report["seconds"] = time.perf_counter() - started
    return report


def figures(results: dict) -> dict:
    """The issue's figures from the settings that were measured."""
    found = {}
    if "ray" in results and "in-process" in results:
        found["ray_vs_in_process"] = results["ray"]["images_per_s"] / results["in-process"]["images_per_s"]
    if "ray-2-workers" in results and "ray-1-thread" in results:
        found["two_workers_sampling_speedup"] = (results["ray-2-workers"]["sample_images_per_s"]
                                                 / results["ray-1-thread"]["sample_images_per_s"])
        found["two_workers_iteration_speedup"] = (results["ray-2-workers"]["images_per_s"]
                                                  / results["ray-1-thread"]["images_per_s"])
    if "ray" in results:
        ray = results["ray"]
        found["broadcast_latency_share_of_iteration"] = ray["stages_s"]["broadcast"] / ray["iteration_s"]
        found["anchor_share_of_rollout_uncached"] = ray["anchor_share_of_rollout"]
    if "ray-anchor-cache" in results:
        cached = results["ray-anchor-cache"]
        found["anchor_share_of_rollout"] = cached["anchor_share_of_rollout"]
        if "ray" in results:
            found["anchor_cache_iteration_speedup"] = cached["images_per_s"] / results["ray"]["images_per_s"]
    if "ray-overlap" in results and "ray" in results:
        found["overlap_throughput_ratio"] = results["ray-overlap"]["images_per_s"] / results["ray"]["images_per_s"]
    return found


TARGETS = {"ray_vs_in_process": ("≥ 0.95", lambda v: v >= 0.95),
           "two_workers_sampling_speedup": ("≥ 1.8", lambda v: v >= 1.8),
           "broadcast_latency_share_of_iteration": ("< 5 %", lambda v: v < 0.05),
           "anchor_share_of_rollout": ("< 15 % (after caching)", lambda v: v < 0.15)}


def format_report(report: dict) -> str:
    """Markdown: each setting's throughput and stage breakdown, then each figure against its target."""
    settings = report["settings"]
    stages = ["rollout_policy", "rollout_anchor", "sample", *sorted({k for s in settings.values() for k in s["stages_s"]
                                                                    if k.startswith("reward_")}),
              "score", "update", "broadcast", "logging", "idle"]
    lines = ["| setting | images/s | s / iteration | " + " | ".join(stages) + " |",
             "|---" * (3 + len(stages)) + "|"]
    for name, result in settings.items():
        cells = [f"{result['stages_s'].get(s, 0.0):.2f}" for s in stages]
        lines.append(f"| {name} | {result['images_per_s']:.2f} | {result['iteration_s']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "images/s: policy images (trajectories trained on) per second of the loop. "
                  "Stage seconds per iteration; rollout_policy/anchor and reward_* are seconds inside the actors "
                  "(summed over workers), the rest driver wall time; idle = the iteration's wall time not in a stage.",
              "", "| figure | measured | target |", "|---|---|---|"]
    for key, value in report["figures"].items():
        target, met = TARGETS.get(key, ("", None))
        verdict = "" if met is None else (" (met)" if met(value) else " (not met)")
        shown = f"{value:.1%}" if "share" in key else f"{value:.3f}"
        lines.append(f"| {key} | {shown} | {target}{verdict} |")
    lines.append(f"| broadcast bytes per version | {settings[next(iter(settings))]['broadcast_bytes'] / 1e3:.1f} kB "
                 f"(whole UNet {report['unet_bytes'] / 1e6:.2f} MB) | adapter tensors only |")
    gpu = report.get("gpu_sampler")
    if gpu is None:
        lines.append("| GPU sampler vs diffusers pipeline, TFLOP/s | not measured in this run (`radrl bench --gpu` "
                     "on a CUDA machine) | ≥ 1.0; share of peak |")
    else:
        peak = f" = {gpu['share_of_peak']:.1%} of {gpu['peak_tflops_per_s']:.0f}" if gpu["share_of_peak"] else ""
        lines.append(f"| GPU sampler vs diffusers pipeline ({gpu['device']}, {gpu['dtype']}, batch {gpu['batch']}, "
                     f"{gpu['steps']} steps) | {gpu['radrl_vs_diffusers']:.3f} ({gpu['radrl_images_per_s']:.2f} vs "
                     f"{gpu['diffusers_images_per_s']:.2f} images/s), {gpu['radrl_tflops_per_s']:.1f} TFLOP/s{peak} "
                     f"| ≥ 1.0 |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ GPU: the sampler itself

# Dense bf16 tensor-core peaks from NVIDIA's data sheets, matched against torch.cuda.get_device_name() in order.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
                   ("L4", 121e12))


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None when it is not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def sd1_models():
    """Stable Diffusion 1.x at 512 px (64×64 latents) with random weights, from the architecture config."""
    from radrl.config import DiffusionModelConfig
    from radrl.models.diffusion import build_diffusion

    return build_diffusion(DiffusionModelConfig(weights="random", arch="sd1", use_vae=True), 512)


def gpu_sampler_benchmark(models, batch: int = 4, steps: int = 50, device: str = "cuda",
                          dtype: torch.dtype = torch.bfloat16, repeats: int = 3, channels_last: bool = True,
                          compile_unet: bool = False) -> dict:
    """radrl's sampler (LoRA + ACE policy, per-step log-probs and latents recorded) against diffusers'
    StableDiffusionPipeline on the same UNet (its LoRA enabled in both), steps, guidance 5, η 1 and batch.

    Returns images/s of each, their ratio, and radrl's achieved FLOP/s (FlopCounterMode over one sampling
    call) against the device's bf16 peak. Both use SDPA attention (diffusers' default processor) and decode
    with the VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from torch.utils.flop_counter import FlopCounterMode

    from radrl.models.diffusion_policy import DiffusionPolicy
    from radrl.rollout.sampler import sample_trajectories

    policy = DiffusionPolicy(models, lora_rank=4, lora_alpha=4.0, lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
                             ace_tokens=3).to(device, dtype).eval()
    models.text_encoder.to(device, dtype)
    models.vae.to(device, dtype)
    if channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        models.unet.compile()
    reports = ["Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax."] * batch
    noise = torch.randn((batch, *models.latent_shape), device=device, dtype=dtype)
    scheduler = DDIMScheduler.from_config(models.scheduler.config)
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def radrl_call():
        return sample_trajectories(policy, reports, steps, 1.0, 5.0, noise, 0, torch.Generator(device).manual_seed(0))

    def diffusers_call():
        return pipe(reports, num_inference_steps=steps, guidance_scale=5.0, eta=1.0, latents=noise,
                    generator=torch.Generator(device).manual_seed(0), output_type="pt")

    def timed(call) -> float:
        call()  # warm-up (kernels, allocator, compilation)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        synchronize(device)
        return (time.perf_counter() - start) / repeats

    with torch.no_grad():
        radrl_s, diffusers_s = timed(radrl_call), timed(diffusers_call)
        with FlopCounterMode(display=False) as counter:
            radrl_call()
    flops = counter.get_total_flops()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    peak = peak_flops(name) if device.startswith("cuda") else None
    return {"device": name, "dtype": str(dtype), "batch": batch, "steps": steps,
            "latent_shape": list(models.latent_shape), "channels_last": channels_last, "compiled": compile_unet,
            "radrl_images_per_s": batch / radrl_s, "diffusers_images_per_s": batch / diffusers_s,
            "radrl_vs_diffusers": diffusers_s / radrl_s, "flops_per_sample_call": flops,
            "radrl_tflops_per_s": flops / radrl_s / 1e12,
            "peak_tflops_per_s": peak / 1e12 if peak else None,
            "share_of_peak": flops / radrl_s / peak if peak else None}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
