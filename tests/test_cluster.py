"""`radrl train` submitted as a Ray job to a real two-node cluster on this machine (loopback only): a head node and
a worker node, each its own raylet with its own custom resource, so the test can see where each role ran."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@pytest.fixture()
def two_node_cluster(tmp_path, monkeypatch):
    """(dashboard address, environment) of a head node and a worker node, 4 CPUs each; stopped afterwards."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # this Ray's head requires its token; clients read it from ~/.ray
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port, dashboard = free_port(), free_port()
    node = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "4"]
    logs = tmp_path / "ray"
    logs.mkdir()
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--resources", '{"head_node": 100}', *node],
                            env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT)
    processes = [head]
    try:
        wait_for_port(port)
        wait_for_port(dashboard)
        processes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", "--resources", '{"worker_node": 100}', *node],
            env=env, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT))
        from ray.util.state import list_nodes

        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60
        while len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) < 2:
            assert time.time() < deadline, "the worker node did not join"
            time.sleep(1)
        yield address, env
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=90)


def test_radrl_train_as_a_ray_job_runs_its_roles_on_both_nodes(two_node_cluster, tmp_path):
    """The README's `ray job submit … -- radrl train … --address auto`, with a runtime_env, on two nodes."""
    from ray.util.state import list_actors, list_nodes

    address, env = two_node_cluster
    settings = ["learner.iterations=2", "rollout.num_steps=2", "rollout.batch_size=4", "learner.batch_size=4",
                "logging.eval_reports=4", f"logging.run_dir={tmp_path / 'run'}", "orchestration.run_id=radrl-job-test",
                "evaluation.after_training=false",
                "learner.resources={num_cpus: 1, custom: {head_node: 1}}",
                "rollout.resources={num_cpus: 1, custom: {worker_node: 1}}", "rewards.resources={num_cpus: 1}"]
    command = [BIN / "ray", "job", "submit", "--address", address,
               "--runtime-env-json", '{"env_vars": {"HF_HUB_OFFLINE": "1"}}',
               "--", BIN / "radrl", "train", "--address", "auto", "--num-rollout-workers", "2"]
    for setting in settings:
        command += ["--set", setting]
    job = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=900)
    logs = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in logs, logs[-3000:]
    assert "run id radrl-job-test" in logs and "iter    2/2" in logs and "done in" in logs
    assert (tmp_path / "run" / "results.md").is_file()

    nodes = {n.node_id: "head" if "head_node" in n.resources_total else "worker" for n in list_nodes(address=address)}
    placed = {a.name.removeprefix("radrl-job-test-"): nodes[a.node_id]
              for a in list_actors(address=address, filters=[("ray_namespace", "=", "radrl-job-test")], limit=100)}
    assert placed["learner"] == "head" and placed["rollout-0"] == placed["rollout-1"] == "worker"
    assert {"reward-align-0", "reward-diag-0", "reward-consist-0"} <= set(placed)
