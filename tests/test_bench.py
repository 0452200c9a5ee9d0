"""`radrl bench` on tiny settings: every figure is produced; the GPU sampler comparison runs (here on CPU)."""

import numpy as np
import pytest

from radrl.config import load_config
from radrl.orchestration.bench import GPU_SETTINGS, format_report, gpu_sampler_benchmark, peak_flops, run_bench, \
    setting_config

from test_export import tiny_latent_models

pytestmark = pytest.mark.slow


def test_bench_measures_every_setting_and_derives_the_figures():
    cfg = load_config(None, ["rollout.num_steps=2", "rollout.batch_size=4", "learner.batch_size=4",
                             "learner.stat_buffer_size=4", "learner.stat_min_count=2"])
    report = run_bench(cfg, warmup=0, iterations=1, settings=("in-process", "ray", "ray-anchor-cache"), repeats=2)
    assert set(report["settings"]) == {"in-process", "ray", "ray-anchor-cache"}
    assert len(report["figures_per_repeat"]) == 2 and report["figure_spread"]["ray_vs_in_process"] >= 0
    one = report["figures_per_repeat"]  # the reported figure is the mean of the repeats' own ratios
    assert report["figures"]["ray_vs_in_process"] == pytest.approx(np.mean([f["ray_vs_in_process"] for f in one]))
    for result in report["settings"].values():
        assert result["images_per_s"] > 0 and result["stages_s"]["sample"] > 0
        assert result["iteration_s"] >= sum(result["stages_s"][s] for s in ("sample", "score", "update")) - 1e-6
    figures = report["figures"]
    assert figures["ray_vs_in_process"] > 0 and 0 <= figures["broadcast_latency_share_of_iteration"] < 1
    # the cache was filled before measuring: no anchor sampled in steady state
    assert figures["anchor_share_of_rollout"] < figures["anchor_share_of_rollout_uncached"]
    assert report["settings"]["ray"]["broadcast_bytes"] < report["unet_bytes"] / 10  # adapter tensors only
    assert 0 < figures["ray_runtime_cpu_share"] < 1  # raylet, GCS and agents did some work meanwhile
    table = format_report(report)
    assert "ray_vs_in_process" in table and "not measured in this run" in table and " ± " in table


def test_sampler_comparison_with_diffusers_pipeline_runs_on_a_tiny_latent_model():
    models = tiny_latent_models(latent_size=8)
    result = gpu_sampler_benchmark(models, batch=2, steps=2, device="cpu", precision="fp32", repeats=1,
                                   channels_last=False)
    assert result["radrl_images_per_s"] > 0 and result["diffusers_images_per_s"] > 0
    assert result["flops_per_sample_call"] > 0 and result["share_of_peak"] is None  # no peak known for a CPU
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12


def test_gpu_settings_fit_two_workers_learner_and_rewards_on_one_device(tmp_path):
    cfg = load_config(None, ["rollout.batch_size=8"])
    one, two = (setting_config(cfg, name, tmp_path) for name in GPU_SETTINGS)
    assert one.rollout.num_workers == 1 and one.rollout.batch_size == 8
    assert two.rollout.num_workers == 2 and two.rollout.trajectories_per_iteration == 8  # same images per iteration
    share = (two.rollout.num_workers * two.rollout.resources.num_gpus + two.learner.resources.num_gpus
             + 3 * two.rewards.replicas * two.rewards.resources.num_gpus)
    assert 0 < share <= 1.0


def test_sampling_ceiling_times_one_and_two_bare_processes_on_the_same_images():
    from radrl.orchestration.bench import sampling_ceiling

    cfg = load_config(None, ["rollout.num_steps=2", "rollout.batch_size=3", "learner.batch_size=3",
                             "learner.stat_buffer_size=3", "learner.stat_min_count=2"])  # odd: halves of 2 and 1 reports
    ceiling = sampling_ceiling(cfg, rounds=1)
    assert ceiling["one_process"] > 0 and ceiling["two_processes"] > 0
    assert ceiling["two_processes_speedup"] == pytest.approx(ceiling["two_processes"] / ceiling["one_process"])
