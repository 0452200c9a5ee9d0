"""`radrl bench`: where a CXRL iteration's time goes and what the distribution costs, measured in one run.

Every setting runs the same driver loop (`CXRLTrainer.train_step`) on the same config, seeds
and models for `warmup` + `iterations` iterations and keeps the measured ones:

    in-process     --local: every role in this process (the baseline)
    ray            the same work on Ray actors, one rollout worker
    ray-1-thread   one rollout worker with one CPU (one torch thread)
    ray-2-workers  two rollout workers with one CPU each, half the batch each (same images per iteration)
    ray-anchor-cache   anchor scores cached per (report, x_T seed) and precomputed (steady state)
    ray-overlap    iteration k+1 sampled while k is scored and trained (one version stale)
    gpu-1-worker, gpu-2-workers   (--gpu) every role on one CUDA device: 1 vs 2 rollout workers sharing it

Beside them, the machine's own ceiling for two workers (`sampling_ceiling`): the policy's sampling of one
iteration's images in one bare process with one thread, against the same images split over two bare processes
running at once (no Ray, no driver, no reward actors): the most two 1-CPU workers could gain here.

From these: the Ray/in-process throughput ratio, the 2-vs-1 worker sampling speed-up, the stage
breakdown (sampling split into policy and anchor, each reward, update, broadcast, logging,
idle = the rest of the iteration's wall time), broadcast bytes (adapter vs the whole UNet) and
latency, and the anchor's share of rollout time. `--gpu` adds the real-size sampler comparison
(`gpu_sampler_benchmark`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from radrl.config import ExperimentConfig, with_overrides
from radrl.models.diffusion_policy import PublishedWeights
from radrl.orchestration.actors import start_roles
from radrl.orchestration.driver import CXRLTrainer
from radrl.orchestration.tracking import HISTORY_FILE, TOTAL_KEY, read_history
from radrl.progress import progress

log = logging.getLogger("radrl")

SETTINGS = {
    "in-process": ["orchestration.local=true"],
    "ray": [],
    "ray-1-thread": ["rollout.resources.num_cpus=1"],
    "ray-2-workers": ["rollout.num_workers=2", "rollout.resources.num_cpus=1"],
    # a pool of 8 training reports × 4 x_T seeds, anchor scores precomputed: the steady state of a cached run
    # (the cache keeps an anchor score for every row's pair, so it takes one anchor image per policy image)
    "ray-anchor-cache": ["data.n_train=8", "rollout.noise_seeds_per_report=4", "rollout.anchor_cache=true",
                         "rollout.precompute_anchor=true", "rollout.anchor_samples_per_report=null"],
    "ray-overlap": ["orchestration.overlap=true", "orchestration.max_staleness=1"],
}
# --gpu: every role on one CUDA device, in fractions that fit two rollout workers beside the learner and rewards.
_ON_ONE_GPU = ["rollout.resources.num_gpus=0.4", "learner.resources.num_gpus=0.1", "rewards.resources.num_gpus=0.03"]
GPU_SETTINGS = {
    "gpu-1-worker": _ON_ONE_GPU,
    "gpu-2-workers": [*_ON_ONE_GPU, "rollout.num_workers=2"],
}
DRIVER_STAGES = ("sample", "score", "update", "broadcast", "logging")


def setting_config(base: ExperimentConfig, setting: str, run_dir: Path) -> ExperimentConfig:
    """The base config under one setting (two workers split the same iteration: rollout.num_workers changes the
    calls, not what is sampled)."""
    chosen = {**SETTINGS, **GPU_SETTINGS}[setting]
    return with_overrides(base, [*chosen, f"logging.run_dir={run_dir / setting}", "orchestration.dashboard=false"])


def measure(cfg: ExperimentConfig, warmup: int, iterations: int) -> dict:
    """Run warmup + iterations driver iterations; per-iteration seconds per stage and images/s of the measured ones."""
    roles = start_roles(cfg)
    try:
        trainer = CXRLTrainer(cfg, roles)
        if cfg.rollout.precompute_anchor:
            trainer.precompute_anchor()
        for _ in range(warmup):
            trainer.train_step()
        runtime_cpu = ray_runtime_cpu_seconds()
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
        runtime_cpu = ray_runtime_cpu_seconds() - runtime_cpu
        trained = trainer.per_iteration * iterations  # policy images: the trajectories the learner trains on
        broadcast_bytes = scalars["broadcast/bytes"]
    finally:
        roles.cluster.shutdown()
    stages = {k: v / iterations for k, v in seconds.items() if k != "iteration"}
    iteration = wall / iterations
    stages["idle"] = iteration - sum(stages[s] for s in DRIVER_STAGES)
    busy = sum(stages.get(f"rollout_{who}", 0.0) for who in ("policy", "anchor"))  # actor seconds, summed
    return {"images_per_s": trained / wall, "iteration_s": iteration, "stages_s": stages,
            # images sampled (policy and anchor) per second of the sampling stage's wall time
            "sample_images_per_s": sampled / iterations / stages["sample"], "broadcast_bytes": broadcast_bytes,
            "anchor_share_of_rollout": stages.get("rollout_anchor", 0.0) / busy if busy else 0.0,
            # Ray's own processes (raylet, GCS, agents), as a share of every core's time during the measured iterations
            "ray_runtime_cpu_share": runtime_cpu / (wall * (os.cpu_count() or 1))}


# Ray's system processes, matched in their command lines (actors are 'ray::<Class>', the driver is this process).
RAY_RUNTIME_PROCESSES = ("raylet", "gcs_server", "dashboard", "DashboardAgent", "log_monitor", "runtime_env",
                         "monitor.py")


def _ceiling_process(cfg: ExperimentConfig, reports: list[str], rounds: int, start, results) -> None:
    """One bare sampling process (spawned): build the policy with one torch thread, sample once to warm up, wait at
    `start` (a barrier), then sample `reports` `rounds` times; put (first start, last end) in `results`."""
    torch.set_num_threads(1)
    from radrl.rollout.worker import RolloutWorker

    worker = RolloutWorker(cfg)
    worker.load_weights(PublishedWeights(0, worker.policy.trainable_state()))
    worker.generate(reports, 0, 1)
    start.wait()
    begin = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    for index in range(rounds):
        worker.generate(reports, index, index + 1)
    results.put((begin, time.perf_counter()))


def sampling_ceiling(cfg: ExperimentConfig, rounds: int = 3) -> dict:
    """Images per second of bare sampling (no Ray, no driver): one iteration's policy images in one 1-thread
    process, and the same images split over two 1-thread processes at once; their ratio is what two 1-CPU rollout
    workers could reach on this machine at best."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    reports = [f"report {i}: no acute cardiopulmonary abnormality." for i in range(cfg.rollout.batch_size)]
    middle = (len(reports) + 1) // 2
    halves = [reports[:middle], reports[middle:]]
    result = {}
    for name, parts in (("one_process", [reports]), ("two_processes", halves)):
        start, queue = context.Barrier(len(parts)), context.Queue()
        processes = [context.Process(target=_ceiling_process, args=(cfg, part, rounds, start, queue)) for part in parts]
        for process in processes:
            process.start()
        spans = [queue.get() for _ in processes]
        for process in processes:
            process.join()
        wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
        result[name] = len(reports) * rounds / wall
    result["two_processes_speedup"] = result["two_processes"] / result["one_process"]
    return result


def ray_runtime_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by Ray's own processes on this node."""
    import psutil

    total = 0.0
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if any(name in command for name in RAY_RUNTIME_PROCESSES):
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:  # exited between listing and reading
                pass
    return total


def unet_bytes(cfg: ExperimentConfig) -> int:
    """Bytes of the whole UNet (what broadcasting full weights would send), adapters excluded."""
    from radrl.models.diffusion import build_diffusion

    unet = build_diffusion(cfg.models.diffusion, cfg.data.image_size).unet
    return sum(p.numel() * p.element_size() for p in unet.parameters())


def run_bench(cfg: ExperimentConfig, warmup: int = 1, iterations: int = 3,
              settings: tuple[str, ...] = tuple(SETTINGS), repeats: int = 1) -> dict:
    """Measure every setting `repeats` times, interleaved (setting A, B, …, then A, B, … again, so slow drift of
    a shared machine hits every setting alike), and derive the figures: each ratio is taken within one repeat,
    then reported as the mean and the spread (std, ddof 1) over repeats (a JSON-able report)."""
    if cfg.task != "cxrl":
        raise ValueError("radrl bench measures the CXRL loop; give a task: cxrl config")
    started = time.perf_counter()
    rounds: list[dict] = []
    ceilings: list[dict] = []
    bar = progress(desc="bench settings", total=repeats * len(settings), unit="setting")
    with tempfile.TemporaryDirectory(prefix="radrl-bench-") as scratch:
        for repeat in range(repeats):
            results = {}
            for setting in settings:
                log.info("bench: %s, repeat %d/%d (%d + %d iterations)", setting, repeat + 1, repeats, warmup,
                         iterations)
                results[setting] = measure(setting_config(cfg, setting, Path(scratch) / str(repeat)), warmup,
                                           iterations)
                log.info("  %.2f images/s, %.1f s per iteration", results[setting]["images_per_s"],
                         results[setting]["iteration_s"])
                bar.update()
            if "ray-2-workers" in settings:  # the same round, so that its ratio meets the workers' in one drift
                ceilings.append(sampling_ceiling(cfg))
                log.info("  bare processes: two sample %.2f× as fast as one", ceilings[-1]["two_processes_speedup"])
            rounds.append(results)
    per_round = [figures(results) for results in rounds]
    for found, ceiling in zip(per_round, ceilings):
        found["two_bare_processes_sampling_speedup"] = ceiling["two_processes_speedup"]
    report = {"device": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
              "torch": torch.__version__, "config": {"batch": cfg.rollout.batch_size, "steps": cfg.rollout.num_steps,
                                                      "image_size": cfg.data.image_size},
              "warmup": warmup, "iterations": iterations, "repeats": repeats, "settings": average_settings(rounds),
              "unet_bytes": unet_bytes(cfg), "figures": {k: float(np.mean([f[k] for f in per_round]))
                                                         for k in per_round[0]},
              "figure_spread": {k: float(np.std([f[k] for f in per_round], ddof=1)) if repeats > 1 else None
                                for k in per_round[0]},
              "figures_per_repeat": per_round, "sampling_ceiling": ceilings}
    report["figures"]["broadcast_share_of_unet"] = rounds[0][settings[0]]["broadcast_bytes"] / report["unet_bytes"]
    report["seconds"] = time.perf_counter() - started
    return report


def average_settings(rounds: list[dict]) -> dict:
    """Each setting's numbers averaged over the repeats (stage seconds key by key)."""
    averaged = {}
    for setting, first in rounds[0].items():
        runs = [r[setting] for r in rounds]
        averaged[setting] = {key: (float(np.mean([r[key] for r in runs])) if not isinstance(value, dict)
                                   else {k: float(np.mean([r[key].get(k, 0.0) for r in runs])) for k in value})
                             for key, value in first.items()}
    return averaged


def figures(results: dict) -> dict:
    """The issue's figures from the settings that were measured."""
    found = {}
    if "ray" in results and "in-process" in results:
        found["ray_vs_in_process"] = results["ray"]["images_per_s"] / results["in-process"]["images_per_s"]
        found["ray_runtime_cpu_share"] = results["ray"]["ray_runtime_cpu_share"]
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
    if "gpu-2-workers" in results and "gpu-1-worker" in results:
        found["gpu_two_workers_sampling_speedup"] = (results["gpu-2-workers"]["sample_images_per_s"]
                                                     / results["gpu-1-worker"]["sample_images_per_s"])
    if "ray-overlap" in results and "ray" in results:
        found["overlap_throughput_ratio"] = results["ray-overlap"]["images_per_s"] / results["ray"]["images_per_s"]
    return found


TARGETS = {"ray_vs_in_process": ("≥ 0.95", lambda v: v >= 0.95),
           "two_workers_sampling_speedup": ("≥ 1.8", lambda v: v >= 1.8),
           "gpu_two_workers_sampling_speedup": ("≥ 1.8", lambda v: v >= 1.8),
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
    repeats = report.get("repeats", 1)
    lines += ["", f"{repeats} repeat(s) of each setting, interleaved; figures are ratios within a repeat, mean ± std "
                  "over repeats. images/s: policy images (trajectories trained on) per second of the loop; sampling "
                  "speed-ups: images sampled per second of the sampling stage's wall time. "
                  "Stage seconds per iteration; rollout_policy/anchor and reward_* are seconds inside the actors "
                  "(summed over workers), the rest driver wall time; idle = the iteration's wall time not in a stage.",
              "", "| figure | measured | target |", "|---|---|---|"]
    spreads = report.get("figure_spread", {})
    for key, value in report["figures"].items():
        target, met = TARGETS.get(key, ("", None))
        verdict = "" if met is None else (" (met)" if met(value) else " (not met)")
        spread = spreads.get(key)
        if "share" in key:
            shown = f"{value:.1%}" + (f" ± {spread:.1%}" if spread is not None else "")
        else:
            shown = f"{value:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")
        lines.append(f"| {key} | {shown} | {target}{verdict} |")
    lines.append(f"| broadcast bytes per version | {settings[next(iter(settings))]['broadcast_bytes'] / 1e3:.1f} kB "
                 f"(whole UNet {report['unet_bytes'] / 1e6:.2f} MB) | adapter tensors only |")
    if "gpu_two_workers_sampling_speedup" not in report["figures"]:
        lines.append("| gpu_two_workers_sampling_speedup (fractional GPUs on one device) | not measured in this run "
                     "(`radrl bench --gpu` on a CUDA machine) | ≥ 1.8 |")
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


def gpu_sampler_benchmark(models, batch: int = 4, steps: int = 50, device: str = "cuda", precision: str = "bf16",
                          repeats: int = 3, channels_last: bool = True, compile_unet: bool = False) -> dict:
    """radrl's sampler (LoRA + ACE policy, per-step log-probs and latents recorded) against diffusers'
    StableDiffusionPipeline on the same UNet (its LoRA enabled in both), steps, guidance 5, η 1 and batch.

    The policy gets the speed settings training uses (`DiffusionPolicy.accelerate`: bf16 frozen weights,
    fp32 adapters and latents, channels-last, optional compile); the pipeline runs on the same modules.
    Returns images/s of each, their ratio, and radrl's achieved FLOP/s (FlopCounterMode over one sampling
    call) against the device's bf16 peak. Both use SDPA attention (diffusers' default processor) and decode
    with the VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from torch.utils.flop_counter import FlopCounterMode

    from radrl.models.diffusion_policy import DiffusionPolicy
    from radrl.rollout.sampler import sample_trajectories

    policy = DiffusionPolicy(models, lora_rank=4, lora_alpha=4.0, lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
                             ace_tokens=3).accelerate(precision, channels_last, compile_unet).to(device).eval()
    models.text_encoder.to(device)
    models.vae.to(device)
    reports = ["Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax."] * batch
    noise = torch.randn((batch, *models.latent_shape), device=device)  # latents stay fp32 in radrl's sampler
    scheduler = DDIMScheduler.from_config(models.scheduler.config)
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def radrl_call():
        return sample_trajectories(policy, reports, steps, 1.0, 5.0, noise, 0, torch.Generator(device).manual_seed(0))

    def diffusers_call():
        return pipe(reports, num_inference_steps=steps, guidance_scale=5.0, eta=1.0,
                    latents=noise.to(policy.compute_dtype),
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
    return {"device": name, "dtype": str(policy.compute_dtype), "batch": batch, "steps": steps,
            "latent_shape": list(models.latent_shape), "channels_last": channels_last, "compiled": compile_unet,
            "radrl_images_per_s": batch / radrl_s, "diffusers_images_per_s": batch / diffusers_s,
            "radrl_vs_diffusers": diffusers_s / radrl_s, "flops_per_sample_call": flops,
            "radrl_tflops_per_s": flops / radrl_s / 1e12,
            "peak_tflops_per_s": peak / 1e12 if peak else None,
            "share_of_peak": flops / radrl_s / peak if peak else None}


# ---------------------------------------------------------------- overlap: reward curves, on own cores

# Rollout worker and learner on one core each, so sampling the next batch really runs beside the update.
OWN_CORES = ["rollout.resources.num_cpus=1", "learner.resources.num_cpus=1", "orchestration.dashboard=false"]
CURVE_SETTINGS = {"sequential": [], "overlap": ["orchestration.overlap=true", "orchestration.max_staleness=1"]}
CURVE_KEYS = (TOTAL_KEY, "ddpo/clipfrac", "ddpo/approx_kl")


def overlap_curves(cfg: ExperimentConfig, seeds: tuple[int, ...], out_dir: Path) -> dict:
    """Train the config with overlap off and on (same seeds, rollout and learner on one core each) and
    compare: seconds per iteration, and the reward, clip fraction and KL per iteration.

    Each run is a whole `CXRLTrainer.run` in `out_dir/<setting>-seed<k>`; a run with results.json is
    read back instead of trained again, so an interrupted comparison continues where it stopped."""
    from radrl.orchestration.run import run_training

    runs = {}
    for seed in seeds:
        for setting, overrides in CURVE_SETTINGS.items():
            run_dir = out_dir / f"{setting}-seed{seed}"
            run_cfg = with_overrides(cfg, [*OWN_CORES, *overrides, f"seed={seed}", f"logging.run_dir={run_dir}"])
            if not (run_dir / "results.json").is_file():
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an unfinished run: a clean start keeps its timings honest
                log.info("overlap curves: %s, seed %d (%d iterations)", setting, seed, cfg.learner.iterations)
                run_training(run_cfg)
            history = read_history(run_dir / HISTORY_FILE)
            results = json.loads((run_dir / "results.json").read_text())
            runs[run_dir.name] = {"setting": setting, "seed": seed, "history": {
                key: [h[key] for h in history] for key in (*CURVE_KEYS, "timing/iteration", "rollout/staleness")},
                "end_policy_minus_anchor": results["end"]["total"]["policy"] - results["end"]["total"]["anchor"]}
    summary = {}
    for setting in CURVE_SETTINGS:
        mine = [r for r in runs.values() if r["setting"] == setting]
        # the first iteration of an overlapped run samples alone; steady state is what overlap changes
        seconds = [np.mean(r["history"]["timing/iteration"][1:]) for r in mine]
        last = [np.mean(r["history"][TOTAL_KEY][-max(1, len(r["history"][TOTAL_KEY]) // 4):]) for r in mine]
        summary[setting] = {"seconds_per_iteration": float(np.mean(seconds)),
                            "reward_last_quarter": float(np.mean(last)),
                            "reward_last_quarter_std": float(np.std(last, ddof=1)) if len(last) > 1 else 0.0,
                            "clipfrac": float(np.mean([np.mean(r["history"]["ddpo/clipfrac"]) for r in mine])),
                            "approx_kl": float(np.mean([np.mean(r["history"]["ddpo/approx_kl"]) for r in mine])),
                            "end_policy_minus_anchor": float(np.mean([r["end_policy_minus_anchor"] for r in mine]))}
    summary["iteration_speedup"] = (summary["sequential"]["seconds_per_iteration"]
                                    / summary["overlap"]["seconds_per_iteration"])
    report = {"config": {"batch": cfg.rollout.batch_size, "steps": cfg.rollout.num_steps,
                         "iterations": cfg.learner.iterations, "seeds": list(seeds)},
              "summary": summary, "runs": runs}
    (out_dir / "overlap_curves.json").write_text(json.dumps(report, indent=1))
    report["figure"] = str(overlap_figure(runs, out_dir / "overlap_curves.png"))
    return report


def overlap_figure(runs: dict, path: Path) -> Path:
    """Total reward per iteration and per second of training, and the clip fraction, overlap on vs off."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    colours = {"sequential": "tab:blue", "overlap": "tab:orange"}
    for name, run in runs.items():
        history, colour = run["history"], colours[run["setting"]]
        reward = np.asarray(history[TOTAL_KEY])
        window = max(1, len(reward) // 6)
        smooth = np.convolve(reward, np.ones(window) / window, mode="valid")
        steps = np.arange(1, len(reward) + 1)
        wall = np.cumsum(history["timing/iteration"])
        style = dict(color=colour, linestyle=("-", "--", ":", "-.")[run["seed"] % 4])
        label = f"{run['setting']} (seed {run['seed']})"
        axes[0].plot(steps[window - 1:], smooth, lw=1.5, label=label, **style)
        axes[1].plot(wall[window - 1:], smooth, lw=1.5, **style)
        axes[2].plot(steps, history["ddpo/clipfrac"], lw=1, alpha=0.8, **style)
    axes[0].set(xlabel="iteration", ylabel=f"{TOTAL_KEY} (moving mean)", title="reward per iteration")
    axes[1].set(xlabel="training seconds", title="reward per second")
    axes[2].set(xlabel="iteration", title="ddpo/clipfrac")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def format_overlap(report: dict) -> str:
    """Markdown: overlap off vs on, mean over seeds."""
    summary = report["summary"]
    lines = ["| setting | s / iteration | reward, last quarter (mean ± std over seeds) | clipfrac | approx KL "
             "| held-out policy − anchor (end) |", "|---|---|---|---|---|---|"]
    for setting in CURVE_SETTINGS:
        s = summary[setting]
        lines.append(f"| {setting} | {s['seconds_per_iteration']:.2f} | {s['reward_last_quarter']:+.4f} ± "
                     f"{s['reward_last_quarter_std']:.4f} | {s['clipfrac']:.3f} | {s['approx_kl']:.2e} "
                     f"| {s['end_policy_minus_anchor']:+.4f} |")
    lines.append(f"\noverlap iteration speed-up: {summary['iteration_speedup']:.2f}×")
    return "\n".join(lines)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
