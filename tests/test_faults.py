"""Fault injection on short real runs: a process really dies (os._exit, as an OOM kill or a lost node would end it)
at a chosen point, and the run must end as the uninterrupted one does: same iteration count and weight version,
each iteration recorded once, and — CPU, fixed seeds, the same threads per actor — the same final tensors, bit for
bit. `pytest tests/test_faults.py -s` prints the measured rows of the README's "Failures and recovery" table."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radrl.faults import EXIT_CODE, FAULT_DIR_ENV, FAULT_ENV
from test_cluster import free_port, wait_for_port
from test_orchestration import history, small_config, train

pytestmark = pytest.mark.slow

ITERATIONS = 4
RAY_RUN = {"orchestration.local": False, "rollout.num_workers": 2, "rollout.batch_size": 2,
           "rollout.per_iteration": 4, "learner.iterations": ITERATIONS, "logging.checkpoint_every": 2,
           "logging.image_every": 100}


def faulted(tmp_path: Path, faults: str, monkeypatch) -> Path:
    """Run the Ray config with `faults` injected into its actors; returns the run folder."""
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(FAULT_ENV, faults)
    monkeypatch.setenv(FAULT_DIR_ENV, str(markers))
    run = tmp_path / "run"
    _, results = train(small_config(run, **RAY_RUN))
    assert results["iterations"] == ITERATIONS and results["weight_version"] == ITERATIONS
    assert len(list(markers.iterdir())) == len(faults.split(","))  # every injected fault fired
    return run


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"iter_{ITERATIONS:06d}" / "tensors.safetensors")


def assert_same_tensors(run: Path, reference: Path) -> None:
    """LoRA, ACE, optimizer moments and RNG state equal the uninterrupted run's, bit for bit."""
    got, expected = final_tensors(run), final_tensors(reference)
    assert sorted(got) == sorted(expected)
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, different[:5]


def faults_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "faults.jsonl").read_text().splitlines()]


def report(fault: str, did: str, rolled_back: int, seconds: float) -> None:
    print(f"\nFAULT ROW | {fault} | {did} | lost 0 | repeated 0 | rolled back {rolled_back} | recovered in {seconds:.1f} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(small_config(run, **RAY_RUN))
    return run


def test_a_dead_rollout_worker_and_reward_actor_are_replaced_and_their_work_rerun(tmp_path, monkeypatch,
                                                                                   uninterrupted):
    # rollout-1 dies after sampling its share of iteration 1 (its 3rd sample call: start evaluation, grid, iteration
    # 1), before returning it; reward-diag-0 dies as it starts its 5th scoring call (iteration 2).
    run = faulted(tmp_path, "rollout-1:sample:3:after,reward-diag-0:score:5", monkeypatch)
    assert [h["iteration"] for h in history(run)] == list(range(1, ITERATIONS + 1))
    worker, reward = faults_of(run)
    assert (worker["role"], worker["iteration"], worker["calls_resubmitted"]) == ("rollout-1", 1, 1)
    assert (reward["role"], reward["iteration"], reward["calls_resubmitted"]) == ("reward-diag-0", 2, 2)
    assert history(run)[-1]["faults/total"] == 2 and history(run)[-1]["faults/rollout"] == 1
    reference = history(uninterrupted)
    for got, expected in zip(history(run), reference):  # the same images, so the same rewards, every iteration
        assert got["reward/total"] == expected["reward/total"]
    assert_same_tensors(run, uninterrupted)
    report("rollout worker killed mid-sampling", "replaced; its weights reloaded, its call rerun", 0,
           worker["recovery_s"])
    report("reward actor killed mid-scoring", "replaced; its 2 calls rerun", 0, reward["recovery_s"])


def test_a_dead_learner_is_restored_from_the_last_checkpoint_in_the_same_run(tmp_path, monkeypatch, uninterrupted):
    # The learner dies in its 4th update (iteration 4); the last checkpoint is iteration 2, so iteration 3 is redone.
    run = faulted(tmp_path, "learner:update:4", monkeypatch)
    assert [h["iteration"] for h in history(run)] == list(range(1, ITERATIONS + 1))  # iteration 3 once, not twice
    (fault,) = faults_of(run)
    assert (fault["role"], fault["restored_iteration"], fault["iterations_rolled_back"]) == ("learner", 2, 1)
    for got, expected in zip(history(run), history(uninterrupted)):
        assert got["reward/total"] == expected["reward/total"] and got["loss/policy"] == expected["loss/policy"]
    assert_same_tensors(run, uninterrupted)
    report("learner killed mid-update", "replaced, restored from the last checkpoint, rolled back", 1,
           fault["recovery_s"])


def radrl_train(run: Path, iterations: int, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    settings = {"rollout.num_steps": 2, "rollout.batch_size": 4, "learner.batch_size": 4, "learner.iterations": iterations, "learner.stat_buffer_size": 4,
                "learner.stat_min_count": 2, "logging.eval_reports": 4, "logging.image_every": 100,
                "logging.checkpoint_every": 1, "logging.run_dir": str(run), "evaluation.after_training": False}
    command = [sys.executable, "-c", "from radrl.cli import app; app()", "train", "--local", *extra]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)


def test_a_crash_while_writing_a_checkpoint_resumes_from_the_one_before(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert radrl_train(straight, 3).returncode == 0
    (tmp_path / "markers").mkdir()
    dead = radrl_train(crashed, 3, env={FAULT_ENV: "driver:checkpoint_write:2", FAULT_DIR_ENV: str(tmp_path / "markers")})
    assert dead.returncode == EXIT_CODE  # the whole process died with checkpoint 2 half written
    staging = [p.name for p in (crashed / "checkpoints").iterdir()]
    assert "iter_000001" in staging and "iter_000002" not in staging and any(".tmp-" in n for n in staging)
    start = time.perf_counter()
    resumed = radrl_train(crashed, 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "iter_000001" in resumed.stderr
    assert [h["iteration"] for h in history(crashed)] == [1, 2, 3]
    assert not list((crashed / "checkpoints").glob(".tmp-*"))  # the half-written folder was swept
    got = load_file(crashed / "checkpoints" / "iter_000003" / "tensors.safetensors")
    expected = load_file(straight / "checkpoints" / "iter_000003" / "tensors.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    report("process killed while writing a checkpoint", "`--resume` took the previous whole checkpoint", 1,
           time.perf_counter() - start)


def test_a_cluster_too_small_for_the_roles_fails_fast_with_what_they_need(tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
                             "--node-ip-address", "127.0.0.1", "--include-dashboard", "false"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        wait_for_port(port)  # the head's GCS port accepts connections once it is up
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", "from radrl.cli import app; app()", "train", "--address", address,
                               "--set", f"logging.run_dir={tmp_path / 'run'}"],
                              capture_output=True, text=True, env=env, timeout=120)
        seconds = time.perf_counter() - start
    finally:
        head.terminate()
        head.wait(timeout=60)
    assert done.returncode == 1 and seconds < 60
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("radrl train: the Ray cluster cannot run this config")
    for part in ("7 CPU", "learner 1 × (2 CPU", "rollout 1 × (2 CPU", "rewards 3 × (1 CPU", "has 2 CPU",
                 "rollout.num_workers", "rewards.replicas"):
        assert part in message, part
    assert "Traceback" not in done.stderr
    print(f"\nFAULT ROW | cluster of 2 CPUs for roles that need 7 | exits 1 with the resources message | "
          f"- | - | - | in {seconds:.1f} s")


def test_lm_rrg_recovers_a_dead_learner_mid_supervised_epoch_and_a_dead_worker_mid_sampling(tmp_path, monkeypatch):
    import test_rrg_orchestration as rrg

    settings = {"orchestration.local": False, "rollout.num_workers": 2, "learner.supervised_epochs": 2,
                "rollout.resources": "{num_cpus: 0.5}", "rewards.resources": "{num_cpus: 0.5}",
                "learner.resources": "{num_cpus: 0.5}"}
    straight = tmp_path / "straight"
    rrg.train(rrg.small_config(straight, **settings))
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(FAULT_ENV, "learner:supervised_epoch:2,rollout-0:sample:2")
    monkeypatch.setenv(FAULT_DIR_ENV, str(markers))
    run = tmp_path / "run"
    _, results = rrg.train(rrg.small_config(run, **settings))
    assert len(list(markers.iterdir())) == 2 and results["weight_version"] == 2 and results["supervised_epochs"] == 2
    learner, worker = faults_of(run)
    assert (learner["role"], learner["restored_iteration"]) == ("learner", 0)  # back to the checkpoint of epoch 1
    assert worker["role"] == "rollout-0" and worker["calls_resubmitted"] >= 1
    for folder in ("", "supervised"):  # each epoch and iteration recorded once, with the same figures
        got, expected = rrg.history(run / folder), rrg.history(straight / folder)
        assert [h["iteration"] for h in got] == [h["iteration"] for h in expected] == [1, 2]
        for g, e in zip(got, expected):
            assert all(g[k] == e[k] for k in e if not k.startswith(("timing/", "throughput/", "faults/"))), folder
    last = sorted((straight / "checkpoints").iterdir())[-1].name
    got = load_file(run / "checkpoints" / last / "tensors.safetensors")
    expected = load_file(straight / "checkpoints" / last / "tensors.safetensors")
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_past_max_failures_the_run_stops_with_the_resume_hint(tmp_path, monkeypatch):
    from radrl.orchestration.driver import RunFailed

    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(FAULT_ENV, "rollout-0:sample:3")
    monkeypatch.setenv(FAULT_DIR_ENV, str(markers))
    with pytest.raises(RunFailed, match="orchestration.max_failures = 0.*no checkpoint was written yet"):
        train(small_config(tmp_path / "run", **{**RAY_RUN, "orchestration.max_failures": 0}))


def test_an_actor_that_does_not_start_in_time_is_named_with_the_roles_needs(tmp_path):
    from radrl.orchestration.actors import start_roles
    from radrl.orchestration.recovery import StartTimeout

    cfg = small_config(tmp_path, **{**RAY_RUN, "orchestration.start_timeout_s": 0.5})  # models take seconds to load
    with pytest.raises(StartTimeout, match=r"did not start within 0.5 s .*The roles ask for \d+ CPU"):
        start_roles(cfg)
