"""The driver end to end: in-process runs, checkpoints and resume, and the same loop on a local Ray instance."""

import json
import time
import urllib.request

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from radrl.config import load_config
from radrl.checkpoints import check_resumable, latest_checkpoint
from radrl.orchestration.actors import run_id, start_roles
from radrl.orchestration.driver import (CXRLTrainer, RunFailed, StaleRolloutError, check_staleness,
                                       format_results_table, sampling_calls)


def small_config(run_dir, **overrides):
    settings = {"rollout.num_steps": 2, "rollout.batch_size": 4, "learner.batch_size": 4, "learner.iterations": 2,
                "learner.stat_buffer_size": 4, "learner.stat_min_count": 2, "logging.eval_reports": 4,
                "logging.image_every": 1, "logging.checkpoint_every": 1, "logging.run_dir": str(run_dir),
                "orchestration.local": True, "orchestration.dashboard": False}
    settings.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def train(cfg, resume=False):
    roles = start_roles(cfg)
    try:
        trainer = CXRLTrainer(cfg, roles, resume=resume)
        return trainer, trainer.run()
    finally:
        roles.cluster.shutdown()


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_in_process_run_writes_everything_a_user_looks_at(tmp_path):
    trainer, results = train(small_config(tmp_path))
    assert results["iterations"] == 2 and results["weight_version"] == 2
    assert [h["iteration"] for h in history(tmp_path)] == [1, 2]
    first = history(tmp_path)[0]
    for key in ("reward/total", "reward/align/policy", "reward/diag/anchor", "reward/consist/rlcf",
                "reward/win_rate_vs_anchor", "loss/policy", "ddpo/approx_kl", "ddpo/clipfrac", "ddpo/grad_norm",
                "throughput/images_per_s", "timing/sample", "timing/update", "timing/reward_diag"):
        assert np.isfinite(first[key]), key
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"reward/total", "ddpo/approx_kl", "faults/total"} <= set(tags["scalars"])
    assert {"hist/reward_total", "hist/advantages"} <= set(tags["histograms"])
    assert "samples/anchor_vs_policy" in tags["images"] and "config/text_summary" in tags["tensors"]
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # the config as hparams
    assert (tmp_path / "grids" / "iter_000000.png").is_file() and (tmp_path / "grids" / "iter_000002.png").is_file()
    assert (tmp_path / "reward_curves.png").is_file()
    table = (tmp_path / "results.md").read_text()
    assert "r_align" in table and "CLIP cosine" in table and "win rate" in table
    assert "sensitivity" in table and set(results["end"]["diagnosis"]["per_class"]) >= {"Pleural Effusion"}
    assert "| diagnostic accuracy |" in table  # the paper's r_diag; rewards.diag_metric=balanced is named so
    assert "| diagnostic balanced accuracy |" in format_results_table({**results, "diag_metric": "balanced"})
    for part in ("align", "diag", "consist", "total"):
        assert results["end"][part]["anchor"] == pytest.approx(results["start"][part]["anchor"])  # frozen anchor


def test_one_anchor_image_per_report_is_every_samples_reference(tmp_path):
    cfg = small_config(tmp_path, **{"rollout.samples_per_report": 2, "rollout.anchor_samples_per_report": 1,
                                    "rewards.anchor_reference": "report_mean"})
    train(cfg)
    for h in history(tmp_path):
        assert h["rollout/images"] == 4 + 2  # 4 policy images, one anchor image for each of the 2 reports
        for name in ("diag", "consist"):  # each report's samples minus that report's anchor image
            assert h[f"reward/{name}/rlcf"] == pytest.approx(h[f"reward/{name}/policy"] - h[f"reward/{name}/anchor"])
        assert np.isfinite(h["rlcf/paired_variance_ratio/consist"])


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(small_config(straight, **{"learner.iterations": 3}))
    train(small_config(interrupted, **{"learner.iterations": 2}))
    trainer, results = train(small_config(interrupted, **{"learner.iterations": 3}), resume=True)
    assert results["iterations"] == 3 and results["weight_version"] == 3
    resumed, reference = history(interrupted), history(straight)
    assert [h["iteration"] for h in resumed] == [1, 2, 3]  # nothing redone, nothing skipped
    for key in ("reward/total", "reward/consist/policy", "loss/policy"):
        assert resumed[2][key] == pytest.approx(reference[2][key], abs=1e-6), key
    assert latest_checkpoint(interrupted).name == "iter_000003"


def test_resume_refuses_a_config_that_changes_what_is_trained(tmp_path):
    train(small_config(tmp_path, **{"learner.iterations": 1}))
    with pytest.raises(ValueError, match="learner.lr"):
        train(small_config(tmp_path, **{"learner.iterations": 2, "learner.lr": 1e-3}), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(small_config(tmp_path / "elsewhere"), resume=True)


def test_sampling_calls_split_one_iteration_over_the_workers():
    assert sampling_calls(81, 27, 3) == [(0, 27), (27, 54), (54, 81)]  # the real config: one call per GPU
    assert sampling_calls(81, 27, 1) == [(0, 27), (27, 54), (54, 81)]  # one worker makes the same calls in turn
    assert sampling_calls(16, 16, 1, group=4) == [(0, 16)]
    assert sampling_calls(16, 16, 2, group=4) == [(0, 8), (8, 16)]
    assert sampling_calls(16, 16, 3, group=4) == [(0, 4), (4, 8), (8, 16)]  # uneven: whole groups of 4 samples
    assert sampling_calls(8, 16, 4, group=4) == [(0, 4), (4, 8)]  # 2 groups: 2 of the 4 workers have work


def test_worker_count_changes_the_calls_not_what_an_iteration_trains(tmp_path):
    """1 or 3 rollout workers: the same 8 images of the same reports per iteration, and the same 2 optimizer
    steps (learner.batch_size 4, one inner epoch); only the sampling calls are split differently."""
    seen = {}
    for workers in (1, 3):
        cfg = small_config(tmp_path / str(workers), **{
            "rollout.num_workers": workers, "rollout.per_iteration": 8, "rollout.batch_size": 8,
            "rollout.samples_per_report": 2, "learner.iterations": 1, "learner.inner_epochs": 1})
        roles = start_roles(cfg)
        try:
            trainer = CXRLTrainer(cfg, roles)
            batch = trainer.submit_batch(0)
            trainer.next_batch = batch  # train_step uses it
            scalars = trainer.train_step()
        finally:
            roles.cluster.shutdown()
        seen[workers] = (batch.reports, len(batch.trajectories), scalars["ddpo/trajectories"],
                         scalars["ddpo/optimizer_steps"])
    reports_1, calls_1, *accounting_1 = seen[1]
    reports_3, calls_3, *accounting_3 = seen[3]
    assert (calls_1, calls_3) == (1, 3)
    assert reports_1 == reports_3 and len(reports_1) == 8
    assert accounting_1 == accounting_3 == [8, 2]


def test_check_staleness():
    check_staleness([3, 3], learner_version=3, max_staleness=0)
    check_staleness([2], learner_version=3, max_staleness=1)
    with pytest.raises(StaleRolloutError, match="weight version 2 but the learner is at 3"):
        check_staleness([3, 2], learner_version=3, max_staleness=0)


def test_check_resumable_allows_scale_changes_only():
    saved = {"learner": {"iterations": 10, "lr": 3e-4}, "rollout": {"num_workers": 1}}
    check_resumable(saved, {"learner": {"iterations": 20, "lr": 3e-4}, "rollout": {"num_workers": 4}})
    with pytest.raises(ValueError, match="learner.lr"):
        check_resumable(saved, {"learner": {"iterations": 20, "lr": 1e-3}, "rollout": {"num_workers": 1}})


def scrape_radrl_metrics(port: int, iteration: float, seconds: float = 60) -> dict[str, float]:
    """The radrl_* series on a Ray node's Prometheus endpoint (name → last value), once the iteration gauge reads
    `iteration` (Ray exports every few seconds, so an early scrape can still show an earlier iteration)."""
    deadline, found = time.time() + seconds, {}
    while time.time() < deadline and found.get("ray_radrl_iteration") != iteration:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {line.split("{")[0].split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("ray_radrl_")}
        time.sleep(1)
    return found


@pytest.mark.slow
def test_two_iterations_on_local_ray_with_two_rollout_workers(tmp_path):
    ray = pytest.importorskip("ray")
    cfg = small_config(tmp_path, **{"orchestration.local": False, "rollout.num_workers": 2, "rollout.batch_size": 2,
                                    "rollout.per_iteration": 4, "logging.eval_reports": 4, "learner.iterations": 2})
    roles = start_roles(cfg)
    try:
        prefix = run_id(cfg)  # the run's namespace and actor-name prefix
        assert ray.get_runtime_context().namespace == prefix and prefix.startswith(f"radrl-{tmp_path.name}-")
        assert {ray.get_actor(f"{prefix}-rollout-{i}") for i in range(2)} and ray.get_actor(f"{prefix}-learner")
        assert all(ray.get_actor(f"{prefix}-reward-{name}-0") for name in ("align", "diag", "consist"))
        trainer = CXRLTrainer(cfg, roles)
        results = trainer.run()
        assert results["iterations"] == 2
        get = roles.cluster.get
        learner_version = get(roles.learner.publish.remote()).version
        assert learner_version == 2
        assert get([w.held_version.remote() for w in roles.workers]) == [2, 2]
        trajectories, rollouts = trainer.sample(trainer.eval_reports, ("check",), with_anchor=False)
        assert [t.weight_version for t in get(trajectories)] == [2, 2]  # one batch from each worker
        assert [r.weight_version for r in rollouts] == [2, 2]
        assert [h["iteration"] for h in history(tmp_path)] == [1, 2]
        exported = scrape_radrl_metrics(ray.nodes()[0]["MetricsExportPort"], 2.0)  # what Prometheus would read
        assert {"ray_radrl_iteration", "ray_radrl_samples_generated_total", "ray_radrl_reward_total",
                "ray_radrl_stage_seconds"} <= set(exported)
        assert exported["ray_radrl_iteration"] == 2.0

        # A rollout worker killed between runs is replaced when its death shows, with the current weights.
        killed = roles.workers[1].actor
        ray.kill(killed)
        deadline = time.time() + 60
        while time.time() < deadline:  # ray.kill is asynchronous: wait until a call on the old handle fails
            try:
                ray.get(killed.__ray_ready__.remote(), timeout=10)
                time.sleep(0.5)
            except ray.exceptions.RayActorError:
                break
        else:
            pytest.fail("the killed actor still answers after 60 s")
        assert get(roles.workers[1].held_version.remote()) == 2  # the weights it held are loaded into it first
        assert roles.workers[1].generation == 1
        assert [f["role"] for f in roles.cluster.drain_faults()] == ["rollout-1"]
    finally:
        roles.cluster.shutdown()


def test_a_checkpoint_from_before_an_option_existed_resumes_with_it_at_its_default():
    saved = {"learner": {"iterations": 10, "lr": 3e-4}}  # written before learner.algorithm and friends existed
    check_resumable(saved, {"learner": {"iterations": 20, "lr": 3e-4, "algorithm": "ddpo", "anchor_penalty": 0.0}})
    with pytest.raises(ValueError, match="learner.algorithm"):
        check_resumable(saved, {"learner": {"iterations": 20, "lr": 3e-4, "algorithm": "draft"}})
