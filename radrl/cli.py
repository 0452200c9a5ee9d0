"""The `radrl` command."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

# Nothing reaches for a model hub unless the user says so (HF_HUB_OFFLINE=0).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a bar per tiny model load is noise

app = typer.Typer(help="RL fine-tuning of chest X-ray generative models (CXRL, LM-RRG) on Ray.", no_args_is_help=True)


@app.command()
def bootstrap(
    out: Annotated[Path | None, typer.Option(help="where to write the models (default: inside the package)")] = None,
    quick: Annotated[bool, typer.Option(help="a tiny smoke-test plan (seconds, useless models)")] = False,
    seed: int = 0,
    force: Annotated[bool, typer.Option(help="replace OUT even if bootstrap did not write it")] = False,
    operating_points: Annotated[bool, typer.Option(
        help="only refit the classifier's operating points (Youden's J on validation phantoms) and remeasure the "
             "quality report of the models already in OUT")] = False,
) -> None:
    """Train every tiny model on the embedded world and write them with a quality report (~25 min on 2 cores)."""
    from radrl.bootstrap import BootstrapPlan, fit_classifier_operating_points, measure_quality, run_bootstrap
    from radrl.models.weights import EMBEDDED_DIR

    plan = BootstrapPlan.quick() if quick else BootstrapPlan()
    if operating_points:
        folder = out or EMBEDDED_DIR
        typer.echo(f"wrote {fit_classifier_operating_points(folder, plan, seed)}")
        quality = json.loads((folder / "quality.json").read_text())
        quality |= measure_quality(folder, plan, seed)  # keeps the training time of the models
        (folder / "quality.json").write_text(json.dumps(quality, indent=2))
    else:
        try:
            quality = run_bootstrap(out or EMBEDDED_DIR, plan, seed, force)
        except FileExistsError as error:
            typer.echo(f"radrl bootstrap: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(format_quality(quality))


@app.command()
def models() -> None:
    """Show the quality report of the shipped tiny models."""
    from radrl.models.weights import embedded_path

    typer.echo(format_quality(json.loads(embedded_path("quality.json").read_text())))


@app.command()
def labels(
    split: Annotated[str, typer.Option(help="IU split to measure on: train, val, test or all")] = "all",
) -> None:
    """Agreement of the rule labeler with the IU X-ray MeSH annotations, per shared class."""
    from radrl.data.iu_reports import iu_split, load_iu_reports
    from radrl.data.mesh_agreement import agreement_table, format_agreement_table

    reports = load_iu_reports() if split == "all" else iu_split(split)
    typer.echo(f"{len(reports)} IU reports ({split}); labeler POSITIVE or UNCERTAIN counts as positive")
    typer.echo(format_agreement_table(agreement_table(reports)))


@app.command()
def config(
    path: Annotated[Path | None, typer.Argument(help="YAML config (default: schema defaults)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set learner.lr=1e-4")] = None,
) -> None:
    """Validate a config with its overrides and print the full result."""
    import yaml

    from radrl.config import ConfigError, load_config

    try:
        cfg = load_config(path, set_ or [])
    except ConfigError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    from radrl.orchestration.actors import resource_needs

    typer.echo(f"# On Ray: {resource_needs(cfg)}")


DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "cxrl_tiny.yaml"  # shipped inside the package


@app.command()
def train(
    path: Annotated[Path | None, typer.Argument(help="YAML config (default: configs/cxrl_tiny.yaml)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set learner.lr=1e-4")] = None,
    local: Annotated[bool, typer.Option("--local", help="run every role in this process, no Ray")] = False,
    address: Annotated[str | None, typer.Option(help="join a Ray cluster ('auto': the one on this node)")] = None,
    num_rollout_workers: Annotated[int | None, typer.Option(help="rollout worker actors")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run folder's latest checkpoint")] = False,
) -> None:
    """Train CXRL, or LM-RRG (supervised then CQRL), on a local Ray instance, a cluster (--address) or in-process (--local)."""
    overrides = list(set_ or [])
    if local:
        overrides.append("orchestration.local=true")
    if address:
        overrides.append(f"orchestration.address={address}")
    if num_rollout_workers is not None:
        overrides.append(f"rollout.num_workers={num_rollout_workers}")
    cfg = _load_config(path, overrides)
    _setup_logging()
    from radrl.models.weights import MissingWeightsError
    from radrl.orchestration.actors import ClusterTooSmall, ClusterUnreachable
    from radrl.checkpoints import CorruptCheckpoint
    from radrl.orchestration.driver import RunFailed
    from radrl.orchestration.recovery import StartTimeout
    from radrl.orchestration.run import run_training

    try:
        table = run_training(cfg, resume=resume)
    except (RunFailed, MissingWeightsError, FileNotFoundError, ClusterTooSmall, ClusterUnreachable, StartTimeout,
            CorruptCheckpoint) as error:
        typer.echo(f"radrl train: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(table)
    if cfg.task == "cxrl" and cfg.evaluation.after_training:  # the image metrics a reward cannot show (FID, diversity)
        from radrl.eval.run import run_evaluation

        try:
            _, evaluated = run_evaluation(cfg, cfg.logging.run_dir)
        except (MissingWeightsError, FileNotFoundError, ValueError) as error:
            typer.echo(f"radrl train: the run finished and is saved, but its evaluation failed: {error}; run "
                       f"`radrl eval --checkpoint {cfg.logging.run_dir}` once the cause is fixed", err=True)
            raise typer.Exit(1) from None
        typer.echo("\n" + evaluated.read_text())
        typer.echo(f"evaluation written to {evaluated.parent}")


def _setup_logging() -> None:
    """radrl's own progress at INFO; libraries (open_clip logs every model load on the root logger) at WARNING."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("radrl").setLevel(logging.INFO)


def _load_config(path: Path | None, overrides: list[str]):
    from radrl.config import ConfigError, load_config

    try:
        return load_config(path or DEFAULT_CONFIG, overrides)
    except ConfigError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None


@app.command(name="eval")
def evaluate(
    path: Annotated[Path | None, typer.Argument(help="YAML config of the run (default: the checkpoint's own config, "
                                                     "else configs/cxrl_tiny.yaml)")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="a run folder (the checkpoint its run kept, else its "
                                                             "latest) or a checkpoint folder; cxrl without it: the "
                                                             "anchor alone")] = None,
    model: Annotated[list[str] | None, typer.Option(help="what to evaluate (repeatable): cxrl anchor/policy, "
                                                         "rrg supervised/policy; default both")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default <run_dir>/eval/<checkpoint>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set evaluation.reports=256")] = None,
) -> None:
    """Evaluate a checkpoint on held-out data: the paper's metrics as a table, CSV, TensorBoard and figures."""
    from radrl.eval.run import checkpoint_config, run_evaluation
    from radrl.models.weights import MissingWeightsError

    try:
        cfg = checkpoint_config(checkpoint, list(set_ or [])) if path is None and checkpoint else None
    except (FileNotFoundError, ValueError) as error:  # no checkpoint there, or a --set the config rejects
        typer.echo(f"radrl eval: {error}", err=True)
        raise typer.Exit(1) from None
    cfg = cfg or _load_config(path, list(set_ or []))
    _setup_logging()
    try:
        _, table = run_evaluation(cfg, checkpoint, tuple(model) if model else None, out)
    except (MissingWeightsError, FileNotFoundError, ValueError) as error:
        typer.echo(f"radrl eval: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(table.read_text())
    typer.echo(f"written to {table.parent}")


@app.command(name="train-posture")
def train_posture(
    source: Annotated[Path, typer.Argument(help="a MIMIC-CXR-JPG root (its train split's frontal films) or a folder "
                                                "of PNG/JPEG films")],
    out: Annotated[Path, typer.Option(help="the weights file to write (models.posture.weights)")] = Path(
        "posture_resnet18.safetensors"),
    arch: Annotated[str, typer.Option(help="resnet18 (the paper's) or tiny")] = "resnet18",
    image_size: Annotated[int, typer.Option(help="films are centre-cropped and resized to this (the generated "
                                                 "images' size, data.image_size)")] = 512,
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 3e-4,
    limit: Annotated[int | None, typer.Option(help="at most this many films (a seeded draw)")] = None,
    workers: Annotated[int, typer.Option(help="image-reading processes")] = 0,
    seed: int = 0,
) -> None:
    """Train the posture regressor of r_align with the paper's unsupervised alignment loss (L2 to the mean of 500
    training films) and write the file the real CXRL config reads."""
    from radrl.models.posture import BLOCKS
    from radrl.models.posture_training import train_posture_regressor

    if arch not in BLOCKS:
        typer.echo(f"radrl train-posture: --arch {arch!r}: choose from {sorted(BLOCKS)}", err=True)
        raise typer.Exit(1)
    _setup_logging()
    try:
        summary = train_posture_regressor(source, out, arch, image_size, epochs, batch_size, lr, limit, seed, workers)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"radrl train-posture: {error}", err=True)
        raise typer.Exit(1) from None
    losses = summary["alignment_l2_per_epoch"]
    typer.echo(f"wrote {out} ({summary['films']} films, {arch}, {image_size} px): alignment L2 "
               f"{summary['alignment_l2_upright']:.5f} upright → {losses[-1] if losses else float('nan'):.5f}; use it "
               f"with --set models.posture.weights={out} --set models.posture.arch={arch}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="a run folder (the checkpoint its run kept, else its latest) or a "
                                             "checkpoint folder")],
    out: Annotated[Path | None, typer.Option(help="output folder (default <run>/export)")] = None,
    merged: Annotated[bool, typer.Option(help="LM-RRG: also write the decoder with the LoRA merged in")] = False,
) -> None:
    """Export a trained run: CXRL → diffusers LoRA + ACE tokens; LM-RRG → transformers decoder + PEFT adapter +
    visual weights; each with a model card (README.md) that says how to load it."""
    from radrl.checkpoints import CorruptCheckpoint
    from radrl.export import export_run
    from radrl.models.weights import MissingWeightsError

    try:
        folder, info = export_run(run, out, merged)
    except (FileNotFoundError, ValueError, MissingWeightsError, CorruptCheckpoint) as error:
        typer.echo(f"radrl export: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"exported {info['task']} iteration {info['iteration']} of {info['checkpoint']} to {folder}; "
               f"how to load it: {folder / 'README.md'}")


@app.command()
def sample(
    source: Annotated[Path, typer.Argument(help="a run folder, a checkpoint folder or a `radrl export` folder")],
    report: Annotated[list[str] | None, typer.Option(help="CXRL: a report to draw (repeatable)")] = None,
    reports_file: Annotated[Path | None, typer.Option(help="CXRL: a text file, one report per line")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="LM-RRG: an image file or folder (repeatable)")] = None,
    held_out: Annotated[int, typer.Option(help="also take N held-out reports (CXRL) or images (LM-RRG), a seeded "
                                               "draw; with nothing else given: 8")] = 0,
    held_out_id: Annotated[list[int] | None, typer.Option(help="a held-out pair by its position in the held-out set "
                                                               "(repeatable): its report (CXRL) or image (LM-RRG)")]
    = None,
    anchor: Annotated[bool, typer.Option(help="CXRL: the base model's image beside the policy's (same noise)")] = False,
    eta: Annotated[float | None, typer.Option(help="CXRL: DDIM η (default: the training config's; 0 = deterministic)")]
    = None,
    seed: int = 0,
    out: Annotated[Path | None, typer.Option(help="output folder (default <source>/samples)")] = None,
) -> None:
    """Reports → X-ray images (CXRL) or X-ray images → reports (LM-RRG), with a contact sheet."""
    from radrl.export.sample import run_sample
    from radrl.models.weights import MissingWeightsError

    reports = list(report or [])
    if reports_file:
        if not reports_file.is_file():
            typer.echo(f"radrl sample: --reports-file {reports_file} does not exist", err=True)
            raise typer.Exit(1)
        reports += [line for line in reports_file.read_text().splitlines() if line.strip()]
    _setup_logging()
    try:
        sheet = run_sample(source, out or source / "samples", reports, list(image or []), held_out, anchor, seed, eta,
                           list(held_out_id or []))
    except (FileNotFoundError, ValueError, MissingWeightsError) as error:
        typer.echo(f"radrl sample: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {sheet} and the samples beside it")


ABLATION_CONFIGS = [DEFAULT_CONFIG.parent / "ablate_rrg_tiny.yaml", DEFAULT_CONFIG.parent / "ablate_cxrl_tiny.yaml"]


@app.command()
def ablate(
    paths: Annotated[list[Path] | None, typer.Argument(help="configs whose task's grid to run "
                                                            "(default: configs/ablate_rrg_tiny.yaml and ablate_cxrl_tiny.yaml)")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds per variant (0, 1, …)")] = 3,
    out: Annotated[Path, typer.Option(help="output folder: tables here, one subfolder per config and cell")] = Path("runs/ablate"),
    local: Annotated[bool, typer.Option("--local", help="run the cells one by one in this process, no Ray")] = False,
    address: Annotated[str | None, typer.Option(help="run the cells on a Ray cluster ('auto': the one on this node)")] = None,
    cpus_per_cell: Annotated[float, typer.Option(min=1, help="CPUs (and torch threads) per cell")] = 1.0,
    gpus_per_cell: Annotated[float, typer.Option(min=0, help="GPUs per cell (fractions share a device)")] = 0.0,
    variant: Annotated[list[str] | None, typer.Option(help="run only these rows (repeatable), e.g. --variant full "
                                                           "--variant anchor; default all")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override for every config, e.g. --set learner.iterations=4")] = None,
) -> None:
    """Run the papers' ablation grids (CXRL: components and rewards; LM-RRG: CQRL variants) over seeds; render the tables.

    Finished cells are kept: rerunning the same command runs only what is missing."""
    overrides = list(set_ or []) + ([f"orchestration.address={address}"] if address else [])
    grids = {}
    for path in paths or ABLATION_CONFIGS:
        grids[path.stem] = _load_config(path, overrides)
    if len(grids) != len(paths or ABLATION_CONFIGS):
        typer.echo("radrl ablate: two configs share a file name; give each grid a distinct one", err=True)
        raise typer.Exit(2)
    _setup_logging()
    from radrl.orchestration.ablate import run_ablation

    try:
        tables = run_ablation(grids, seeds, out, local, cpus_per_cell, gpus_per_cell, tuple(variant or ()))
    except (RuntimeError, ValueError) as error:
        typer.echo(f"radrl ablate: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(tables)


@app.command(name="compare-learners")
def compare_learners(
    path: Annotated[Path | None, typer.Argument(help="CXRL config of every cell, with its learner.time_budget_minutes "
                                                     "(default: configs/compare_learners_tiny.yaml)")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds per learner (0, 1, …)")] = 3,
    out: Annotated[Path, typer.Option(help="output folder: tables, curves.png, one subfolder per cell")] = Path(
        "runs/compare_learners"),
    local: Annotated[bool, typer.Option("--local", help="run the cells one by one in this process, no Ray")] = False,
    address: Annotated[str | None, typer.Option(help="run the cells on a Ray cluster ('auto': the one on this node)")] = None,
    cpus_per_cell: Annotated[float, typer.Option(min=1, help="CPUs (and torch threads) per cell")] = 1.0,
    gpus_per_cell: Annotated[float, typer.Option(min=0, help="GPUs per cell (fractions share a device)")] = 0.0,
    variant: Annotated[list[str] | None, typer.Option(help="only these learners (repeatable): ddpo, draft_k1, "
                                                           "draft_k3, anchor")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set learner.time_budget_minutes=3")] = None,
) -> None:
    """DDPO against reward backpropagation (DRaFT-K) at equal wall-clock budget over seeds: held-out curves against
    training time and images, and the paper's metrics at the end. Finished cells are kept (rerun to resume)."""
    path = path or DEFAULT_CONFIG.parent / "compare_learners_tiny.yaml"
    cfg = _load_config(path, list(set_ or []) + ([f"orchestration.address={address}"] if address else []))
    if cfg.task != "cxrl" or cfg.learner.time_budget_minutes is None:
        typer.echo(f"radrl compare-learners: {path} must be a cxrl config with learner.time_budget_minutes set (the "
                   "equal budget every learner gets)", err=True)
        raise typer.Exit(2)
    _setup_logging()
    from radrl.orchestration.ablate import run_ablation

    try:
        tables = run_ablation({path.stem: cfg}, seeds, out, local, cpus_per_cell, gpus_per_cell, tuple(variant or ()),
                              kinds={path.stem: "learners"})
    except (RuntimeError, ValueError) as error:
        typer.echo(f"radrl compare-learners: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(tables)
    typer.echo(f"curves: {out / path.stem / 'curves.png'}")


@app.command()
def bench(
    path: Annotated[Path | None, typer.Argument(help="CXRL config to measure (default: configs/cxrl_tiny.yaml)")] = None,
    iterations: Annotated[int, typer.Option(min=1, help="measured iterations per setting")] = 2,
    warmup: Annotated[int, typer.Option(min=0, help="iterations run before measuring, per setting")] = 1,
    batch: Annotated[int, typer.Option(min=4, help="policy images per iteration (rollout and learner batch); "
                                                   "two workers make one sampling call each")] = 8,
    repeats: Annotated[int, typer.Option(min=1, help="rounds over every setting, interleaved; ratios get a spread "
                                                     "over rounds")] = 3,
    out: Annotated[Path, typer.Option(help="where to write the JSON")] = Path("runs/bench/bench.json"),
    gpu: Annotated[bool, typer.Option("--gpu", help="also compare radrl's sampler with diffusers' pipeline at SD 1.x "
                                                    "size (512 px, bf16) on the CUDA device")] = False,
    gpu_batch: Annotated[int, typer.Option(min=1, help="--gpu: images per sampling call")] = 4,
    gpu_steps: Annotated[int, typer.Option(min=1, help="--gpu: DDIM steps")] = 50,
    compile_unet: Annotated[bool, typer.Option("--compile", help="--gpu: torch.compile the UNet")] = False,
    overlap_curves: Annotated[bool, typer.Option(
        "--overlap-curves", help="instead: train with overlap off and on (rollout and learner on one core each) and "
                                 "compare seconds per iteration and reward curves (long: whole runs)")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="--overlap-curves: runs per setting")] = 2,
    curve_iterations: Annotated[int, typer.Option(min=2, help="--overlap-curves: iterations per run")] = 20,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set rollout.num_steps=20")] = None,
) -> None:
    """Measure the CXRL loop: Ray vs in-process throughput, 1 vs 2 rollout workers, stage breakdown, broadcast, anchor."""
    sizes = [f"rollout.batch_size={batch}", f"learner.batch_size={batch}"]
    if overlap_curves:
        sizes.append(f"learner.iterations={curve_iterations}")
    cfg = _load_config(path, [*sizes, *(set_ or [])])
    _setup_logging()
    import torch

    from radrl.orchestration import bench as benchmarks
    from radrl.orchestration.bench import format_report, gpu_sampler_benchmark, run_bench, sd1_models

    if overlap_curves:
        out.parent.mkdir(parents=True, exist_ok=True)
        report = benchmarks.overlap_curves(cfg, tuple(range(seeds)), out.parent)
        typer.echo(benchmarks.format_overlap(report))
        typer.echo(f"written to {out.parent / 'overlap_curves.json'} and {report['figure']}")
        return

    if gpu and not torch.cuda.is_available():
        typer.echo("radrl bench --gpu: no CUDA device here; run it on a GPU machine (the CPU figures need no flag)",
                   err=True)
        raise typer.Exit(2)
    try:
        settings = (*benchmarks.SETTINGS, *(benchmarks.GPU_SETTINGS if gpu else ()))
        report = run_bench(cfg, warmup, iterations, settings, repeats)
    except ValueError as error:
        typer.echo(f"radrl bench: {error}", err=True)
        raise typer.Exit(2) from None
    if gpu:
        report["gpu_sampler"] = gpu_sampler_benchmark(sd1_models(), gpu_batch, gpu_steps, compile_unet=compile_unet)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    typer.echo(format_report(report))
    typer.echo(f"written to {out} ({report['seconds']:.0f} s)")


@app.command(name="step-gradients")
def step_gradients(
    path: Annotated[Path | None, typer.Argument(help="CXRL config (default: configs/cxrl_tiny.yaml)")] = None,
    batches: Annotated[int, typer.Option(min=1, help="sampled batches of training reports to average over")] = 4,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set rollout.num_steps=20")] = None,
) -> None:
    """CXRL: the DDPO gradient norm of each denoising step (random advantages), to choose learner.min_train_timestep."""
    cfg = _load_config(path, list(set_ or []))
    if cfg.task != "cxrl":
        typer.echo("radrl step-gradients: a CXRL config is needed (task: cxrl)", err=True)
        raise typer.Exit(2)
    _setup_logging()
    from radrl.learner.step_gradients import format_step_gradients, step_gradient_norms

    typer.echo(format_step_gradients(step_gradient_norms(cfg, batches)))


@app.command()
def summarize(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders of finished `radrl train` runs (e.g. one per seed)")],
) -> None:
    """End-of-run policy − anchor per reward over several runs: each run, then mean ± std across runs."""
    from radrl.orchestration.driver import format_seed_summary

    results = []
    for folder in run_dirs:
        path = folder / "results.json"
        if not path.is_file():
            typer.echo(f"{path} not found: is {folder} a finished radrl train run?", err=True)
            raise typer.Exit(2)
        results.append(json.loads(path.read_text()))
    typer.echo(format_seed_summary([str(f) for f in run_dirs], results))


def format_quality(quality: dict) -> str:
    """A short human-readable view of a bootstrap quality report."""
    auroc = quality["classifier_auroc"]
    posture = quality["posture"]
    retrieval = quality["clip_retrieval"]
    diffusion = quality["diffusion"]
    lines = [
        f"embedded tiny models ({quality['image_size']} px, seed {quality['seed']}, trained in {quality['seconds']:.0f} s)",
        f"  classifier      mean AUROC {auroc['mean']:.3f} on held-out phantoms "
        f"(min {min(v for k, v in auroc.items() if k != 'mean'):.3f})",
        f"  posture         |Δr_align| {posture['mae_r_align']:.3f}  |Δθ| {posture['mae_theta']:.3f} rad  "
        f"|Δt_x| {posture['mae_t_x']:.3f}  |Δs_x| {posture['mae_s_x']:.3f}",
        f"  clip            image→report top-1 {retrieval['top1']:.3f}  top-5 {retrieval['top5']:.3f} "
        f"among {retrieval['candidates']} held-out reports",
        f"  decoder LM      held-out perplexity {quality['decoder_perplexity']:.1f}",
    ]
    for source in ("generated", "real_phantoms"):
        d = diffusion[source]
        lines.append(
            f"  diffusion/{source:<13} classifier AUROC vs prompt labels {d['classifier_mean_auroc']:.3f}  "
            f"accuracy {d['classifier_label_accuracy']:.3f}  r_align {d['r_align_mean']:.3f}"
        )
    return "\n".join(lines)
