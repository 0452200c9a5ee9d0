"""Where Ray comes in: the roles as named actors, placed and sized from the config.

The roles are the plain classes (`RolloutWorker`, `RewardScorer`, `DDPOLearner`); this module
only wraps them with `ray.remote`. The learner sits in its own placement group; rollout
workers and reward actors are scheduled outside it, so their number can change from run to
run (`--num-rollout-workers`) without touching the learner's reservation.
"""

from __future__ import annotations

import os
import hashlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from radrl.config import ExperimentConfig, Resources
from radrl.faults import FAULT_DIR_ENV, FAULT_ENV, ROLE_ENV, with_fault_points
from radrl.learner.ddpo_learner import DDPOLearner
from radrl.learner.draft_learner import DraftLearner
from radrl.learner.ppo_learner import ReportLearner
from radrl.orchestration.handles import LocalCluster, LocalHandle
from radrl.orchestration.recovery import CallLedger, StartTimeout
from radrl.reward_actors.report_scorer import ReportRewardScorer
from radrl.reward_actors.scorer import RewardScorer
from radrl.rollout.report_worker import ReportRolloutWorker
from radrl.rollout.worker import RolloutWorker

# The driver's offline and quiet switches hold in every actor, also on nodes of a running cluster.
PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", FAULT_ENV, FAULT_DIR_ENV)
REWARD_NAMES = ("align", "diag", "consist")  # CXRL: every reward model runs (λ = 0 ones for evaluation only)


@dataclass(frozen=True)
class RoleClasses:
    """The plain classes behind each role of a task."""

    worker: type
    learner: type
    reward: type  # built as reward(cfg, name), one actor per name and replica
    reward_names: tuple[str, ...]


def role_classes(cfg: ExperimentConfig) -> RoleClasses:
    """CXRL: diffusion workers, three reward models, the DDPO (or DRaFT) learner. LM-RRG: report workers, one
    report reward (RadCliQ or BLEU-4), the PPO learner."""
    if cfg.task == "cxrl":
        learner = DraftLearner if cfg.learner.algorithm == "draft" else DDPOLearner
        return RoleClasses(RolloutWorker, learner, RewardScorer, REWARD_NAMES)
    return RoleClasses(ReportRolloutWorker, ReportLearner, ReportRewardScorer, (cfg.rewards.rrg_reward,))


@dataclass
class Roles:
    """Handles to every role and the cluster they run on."""

    cluster: object  # LocalCluster or RayCluster: get / put / record / shutdown
    workers: list
    rewards: dict[str, list]  # reward name → replica handles
    learner: object


def start_roles(cfg: ExperimentConfig) -> Roles:
    """Start every role in-process (orchestration.local) or as Ray actors."""
    classes = role_classes(cfg)
    if cfg.orchestration.local:
        return Roles(
            cluster=LocalCluster(),
            workers=[LocalHandle(classes.worker(cfg, i)) for i in range(cfg.rollout.num_workers)],
            rewards={name: [LocalHandle(classes.reward(cfg, name)) for _ in range(cfg.rewards.replicas)]
                     for name in classes.reward_names},
            learner=LocalHandle(classes.learner(cfg)),
        )
    return _start_ray_roles(cfg, classes)


def _options(resources: Resources, name: str, role: str) -> dict:
    # OMP_NUM_THREADS: torch in each actor uses the cores it was given, not every core on the node.
    env = {"OMP_NUM_THREADS": str(max(1, int(resources.num_cpus))), ROLE_ENV: role}
    env.update({key: os.environ[key] for key in PASSED_ENV if key in os.environ})
    options = dict(name=name, num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, runtime_env={"env_vars": env})
    if resources.memory_gb:
        options["memory"] = int(resources.memory_gb * 2**30)
    if resources.custom:
        options["resources"] = dict(resources.custom)
    return options


def _start_ray_roles(cfg: ExperimentConfig, classes: RoleClasses) -> Roles:
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cluster = RayCluster(cfg)
    ray, ledger, prefix = cluster.ray, cluster.ledger, run_id(cfg)
    if shortage := resource_shortage(cfg, *cluster_capacity(ray)):
        cluster.shutdown()
        raise ClusterTooSmall(shortage)
    learner_res = cfg.learner.resources
    bundle = {k: v for k, v in {"CPU": learner_res.num_cpus, "GPU": learner_res.num_gpus, **learner_res.custom}.items()
              if v > 0}
    group = placement_group([bundle or {"CPU": 0.01}], name=f"{prefix}-learner")
    cluster.placement_group = group
    ready, _ = ray.wait([group.ready()], timeout=cfg.orchestration.start_timeout_s)
    if not ready:
        cluster.shutdown()
        raise StartTimeout(f"the learner's resources ({bundle}) were not free within "
                           f"{cfg.orchestration.start_timeout_s:g} s (orchestration.start_timeout_s). "
                           + resource_needs(cfg))
    learner = ledger.role("learner", with_fault_points(classes.learner), (cfg,), {
        **_options(learner_res, f"{prefix}-learner", "learner"),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)}, stateful=True)
    workers = [ledger.role(f"rollout-{i}", with_fault_points(classes.worker), (cfg, i),
                           _options(cfg.rollout.resources, f"{prefix}-rollout-{i}", f"rollout-{i}"))
               for i in range(cfg.rollout.num_workers)]
    rewards = {name: [ledger.role(f"reward-{name}-{r}", with_fault_points(classes.reward), (cfg, name),
                                  _options(cfg.rewards.resources, f"{prefix}-reward-{name}-{r}", f"reward-{name}-{r}"))
                      for r in range(cfg.rewards.replicas)]
               for name in classes.reward_names}
    try:
        ledger.wait_ready(list(ledger.roles.values()), needs=resource_needs(cfg))
    except Exception:
        cluster.shutdown()
        raise
    return Roles(cluster, workers, rewards, learner)


class ClusterTooSmall(RuntimeError):
    """The roles ask for more than the Ray cluster has."""


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at orchestration.address."""


def run_id(cfg: ExperimentConfig) -> str:
    """The run's Ray namespace and actor-name prefix: orchestration.run_id, else from the run folder (its name plus
    a short hash of its absolute path), so two runs on one cluster never share actors."""
    if cfg.orchestration.run_id:
        return cfg.orchestration.run_id
    folder = Path(cfg.logging.run_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name).strip("-") or "run"
    return f"radrl-{slug}-{hashlib.sha1(str(folder).encode()).hexdigest()[:6]}"


def role_requests(cfg: ExperimentConfig) -> dict[str, tuple[int, Resources, str]]:
    """Per role kind: (actors, resources of each, the config keys that size it)."""
    rewards = len(role_classes(cfg).reward_names) * cfg.rewards.replicas
    return {"learner": (1, cfg.learner.resources, "learner.resources"),
            "rollout": (cfg.rollout.num_workers, cfg.rollout.resources,
                        "rollout.resources, rollout.num_workers (--num-rollout-workers)"),
            "rewards": (rewards, cfg.rewards.resources, "rewards.resources, rewards.replicas")}


def _amounts(resources: Resources) -> dict[str, float]:
    return {"CPU": resources.num_cpus, "GPU": resources.num_gpus, "memory": resources.memory_gb * 2**30,
            **resources.custom}


def _format(amounts: dict[str, float]) -> str:
    parts = [f"{amounts.get('CPU', 0):g} CPU", f"{amounts.get('GPU', 0):g} GPU"]
    if amounts.get("memory"):
        parts.append(f"{amounts['memory'] / 2**30:.1f} GiB memory")
    parts += [f"{value:g} {key}" for key, value in amounts.items() if key not in ("CPU", "GPU", "memory") and value]
    return ", ".join(parts)


def _kinds(cfg: ExperimentConfig) -> list[str]:
    """The resource kinds the roles ask for: CPU, GPU, memory and any custom ones."""
    return ["CPU", "GPU", "memory", *sorted({key for _, res, _ in role_requests(cfg).values() for key in res.custom})]


def _needed(cfg: ExperimentConfig) -> dict[str, float]:
    """Each resource kind summed over every actor of every role."""
    requests = role_requests(cfg).values()
    return {key: sum(n * _amounts(res).get(key, 0.0) for n, res, _ in requests) for key in _kinds(cfg)}


def resource_needs(cfg: ExperimentConfig) -> str:
    """'it asks for 7 CPU, 0 GPU in total (learner 1 × 2 CPU, …)'."""
    requests = role_requests(cfg)
    total = _needed(cfg)
    roles = "; ".join(f"{kind} {n} × ({_format(_amounts(res))})" for kind, (n, res, _) in requests.items())
    return f"The roles ask for {_format(total)} in total ({roles})."


def resource_shortage(cfg: ExperimentConfig, total: dict[str, float], largest_node: dict[str, float],
                      nodes: int = 1) -> str | None:
    """What does not fit (a message naming each role's needs, the cluster's totals and the keys to change), or None.
    `total`: the cluster's resources summed over nodes; `largest_node`: the most any one node has of each."""
    requests = role_requests(cfg)
    needed = _needed(cfg)
    short = [key for key in needed if needed[key] > total.get(key, 0.0) + 1e-9]
    too_big = [f"one {kind} actor needs {_format(_amounts(res))}" for kind, (n, res, _) in requests.items()
               if n and any(_amounts(res).get(key, 0.0) > largest_node.get(key, 0.0) + 1e-9 for key in needed)]
    if not short and not too_big:
        return None
    problems = [f"not enough {', '.join(short)} in total"] if short else []
    keys = "; ".join(f"{kind}: {keys}" for kind, (_, _, keys) in requests.items())
    return (f"the Ray cluster cannot run this config ({'; '.join(problems + too_big)}). {resource_needs(cfg)} "
            f"The cluster has {_format(total)} on {nodes} node(s), the largest {_format(largest_node)}. "
            f"Lower these config keys ({keys}) or add nodes.")


def cluster_capacity(ray) -> tuple[dict[str, float], dict[str, float], int]:
    """(total resources, the most any live node has of each, live nodes) of the connected cluster."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in {k for n in nodes for k in n}}
    return dict(ray.cluster_resources()), largest, len(nodes)


def init_ray(address: str | None, num_cpus: int, dashboard: bool, log_to_driver: bool = True,
             namespace: str = "radrl") -> None:
    """Join the cluster at `address`, or start a local Ray instance of `num_cpus` CPUs on this machine only.
    An address nothing answers at raises ClusterUnreachable within seconds (Ray itself retries for minutes)."""
    import ray

    if address:
        check_reachable(address)
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver)
        except ConnectionError as error:
            raise ClusterUnreachable(unreachable_message(address, str(error).splitlines()[0])) from None
    else:
        # address="local": a new instance even where `ray start` left a (perhaps dead) cluster's address behind
        ray.init(address="local", num_cpus=num_cpus, namespace=namespace, include_dashboard=dashboard,
                 log_to_driver=log_to_driver,
                 _node_ip_address="127.0.0.1", configure_logging=False)


def unreachable_message(address: str, detail: str) -> str:
    return (f"cannot reach a Ray cluster at {address} ({detail}). Check that the head node is running (`ray status` "
            "there), that the address is its GCS address host:port (default port 6379) or 'auto' on a node of the "
            "cluster, that no firewall blocks the port, and for token authentication that RAY_AUTH_MODE=token and "
            "the token are set here as on the head.")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port (or ray://host:port) address must accept a TCP connection; 'auto' is left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if not match:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        raise ClusterUnreachable(unreachable_message(address, f"{type(error).__name__}: {error}")) from None


class RayCluster:
    """A connection to Ray (a new local instance, or `orchestration.address`) plus the run's Ray metrics."""

    name = "ray"

    def __init__(self, cfg: ExperimentConfig):
        import ray
        from ray.util import metrics

        self.ray = ray
        init_ray(cfg.orchestration.address, max(os.cpu_count() or 1, required_cpus(cfg)), cfg.orchestration.dashboard,
                 namespace=run_id(cfg))
        self.ledger = CallLedger(ray, cfg.orchestration.max_failures, cfg.orchestration.start_timeout_s)
        self.placement_group = None
        self.samples = metrics.Counter("radrl_samples_generated", "images (cxrl: policy and anchor) or reports (rrg) sampled")
        self.iteration = metrics.Gauge("radrl_iteration", "completed training iterations")
        self.reward = metrics.Gauge("radrl_reward_total", "mean reward of the last iteration")
        self.stage_seconds = metrics.Gauge("radrl_stage_seconds", "seconds per stage of the last iteration",
                                           tag_keys=("stage",))

    def get(self, refs):
        """Results of role calls; a dead rollout worker or reward actor is replaced and its lost work rerun."""
        return self.ledger.get(refs)

    def put(self, value):
        return self.ray.put(value)

    def drain_faults(self) -> list[dict]:
        """Actor failures since the last call (each with its recovery), oldest first."""
        faults, self.ledger.new_faults = self.ledger.new_faults, []
        return faults

    def record(self, iteration: int, samples: int, reward: float, scalars: dict[str, float]) -> None:
        """Export one iteration's figures as Ray metrics (Ray dashboard / Prometheus); stage seconds are
        the scalars under timing/."""
        self.samples.inc(samples)
        self.iteration.set(iteration)
        self.reward.set(reward)
        for key, value in scalars.items():
            if key.startswith("timing/"):
                self.stage_seconds.set(value, tags={"stage": key.removeprefix("timing/")})

    def shutdown(self) -> None:
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
        self.ray.shutdown()


def required_cpus(cfg: ExperimentConfig) -> int:
    """Logical CPUs the roles ask for: a fresh local Ray gets at least this many so none waits forever."""
    total = (cfg.learner.resources.num_cpus + cfg.rollout.num_workers * cfg.rollout.resources.num_cpus
             + len(role_classes(cfg).reward_names) * cfg.rewards.replicas * cfg.rewards.resources.num_cpus)
    return int(-(-total // 1))
