"""The KubeRay RayJob manifests (deploy/kuberay/) hold what their config's roles ask for, and their entrypoints are
valid `radrl train` command lines for that config."""

import shlex
from pathlib import Path

import click
import pytest
import typer
import yaml

from radrl.cli import app
from radrl.config import load_config
from radrl.orchestration.actors import resource_shortage, role_requests

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))


def pods(manifest: dict) -> list[dict[str, float]]:
    """The Ray resources of every worker pod (Ray takes a pod's CPU and GPU from its container limits)."""
    found = []
    for group in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        found += [{"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}] * group["replicas"]
    return found


def train_arguments(entrypoint: str) -> dict:
    """The parameters `radrl train` gets from the entrypoint (parsed by radrl's own CLI, nothing run)."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["radrl", "train"], words
    command = typer.main.get_command(app)
    train = command.get_command(click.Context(command), "train")
    return train.make_context("train", words[2:]).params


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_holds_its_configs_roles_and_its_entrypoint_parses(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["kind"] == "RayJob" and manifest["apiVersion"] == "ray.io/v1"
    params = train_arguments(manifest["spec"]["entrypoint"])
    assert params["path"] == Path("configs") / f"{path.stem}.yaml" and params["address"] == "auto"
    overrides = list(params["set_"] or []) + [f"rollout.num_workers={params['num_rollout_workers']}"]
    cfg = load_config(params["path"], overrides)

    capacity = pods(manifest)
    total = {key: sum(p[key] for p in capacity) for key in ("CPU", "GPU")}
    largest = {key: max(p[key] for p in capacity) for key in ("CPU", "GPU")}
    assert resource_shortage(cfg, total, largest, len(capacity)) is None
    # and the actors pack into the pods one by one (largest GPU share first), not just in total
    free = [dict(p) for p in capacity]
    actors = sorted(((res.num_gpus, res.num_cpus) for n, res, _ in role_requests(cfg).values() for _ in range(n)),
                    reverse=True)
    for gpus, cpus in actors:
        pod = next((p for p in free if p["GPU"] >= gpus - 1e-9 and p["CPU"] >= cpus - 1e-9), None)
        assert pod is not None, f"no pod left for an actor of {gpus} GPU, {cpus} CPU"
        pod["GPU"] -= gpus
        pod["CPU"] -= cpus
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0"  # the driver only: no actor on the head
