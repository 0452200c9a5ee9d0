"""Where Ray comes in: the roles as named actors, placed and sized from the config.

The roles are the plain classes (`RolloutWorker`, `RewardScorer`, `DDPOLearner`); this module
only wraps them with `ray.remote`. The learner sits in its own placement group; rollout
workers and reward actors are scheduled outside it, so their number can change from run to
run (`--num-rollout-workers`) without touching the learner's reservation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from radrl.config import ExperimentConfig, Resources
from radrl.learner.ddpo_learner import DDPOLearner
from radrl.learner.ppo_learner import ReportLearner
from radrl.orchestration.handles import LocalCluster, LocalHandle
from radrl.reward_actors.report_scorer import ReportRewardScorer
from radrl.reward_actors.scorer import RewardScorer
from radrl.rollout.report_worker import ReportRolloutWorker
from radrl.rollout.worker import RolloutWorker

# The driver's offline and quiet switches hold in every actor, also on nodes of a running cluster.
PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS")
REWARD_NAMES = ("align", "diag", "consist")  # CXRL: every reward model runs (λ = 0 ones for evaluation only)


@dataclass(frozen=True)
class RoleClasses:
    """The plain classes behind each role of a task."""

    worker: type
    learner: type
    reward: type  # built as reward(cfg, name), one actor per name and replica
    reward_names: tuple[str, ...]


def role_classes(cfg: ExperimentConfig) -> RoleClasses:
    """CXRL: diffusion workers, three reward models, the DDPO learner. LM-RRG: report workers, one
    report reward (RadCliQ or BLEU-4), the PPO learner."""
    if cfg.task == "cxrl":
        return RoleClasses(RolloutWorker, DDPOLearner, RewardScorer, REWARD_NAMES)
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


def _options(resources: Resources, name: str) -> dict:
    # OMP_NUM_THREADS: torch in each actor uses the cores it was given, not every core on the node.
    env = {"OMP_NUM_THREADS": str(max(1, int(resources.num_cpus)))}
    env.update({key: os.environ[key] for key in PASSED_ENV if key in os.environ})
    return dict(name=name, num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, runtime_env={"env_vars": env})


def _start_ray_roles(cfg: ExperimentConfig, classes: RoleClasses) -> Roles:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cluster = RayCluster(cfg)
    learner_res = cfg.learner.resources
    bundle = {k: v for k, v in {"CPU": learner_res.num_cpus, "GPU": learner_res.num_gpus}.items() if v > 0}
    group = placement_group([bundle or {"CPU": 0.01}], name="radrl-learner")
    ray.get(group.ready(), timeout=300)
    learner = ray.remote(classes.learner).options(
        **_options(learner_res, "radrl-learner"),
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
    ).remote(cfg)
    workers = [ray.remote(classes.worker).options(**_options(cfg.rollout.resources, f"radrl-rollout-{i}")).remote(cfg, i)
               for i in range(cfg.rollout.num_workers)]
    rewards = {name: [ray.remote(classes.reward).options(**_options(cfg.rewards.resources, f"radrl-reward-{name}-{r}"))
                      .remote(cfg, name) for r in range(cfg.rewards.replicas)]
               for name in classes.reward_names}
    cluster.placement_group = group
    return Roles(cluster, workers, rewards, learner)


def init_ray(address: str | None, num_cpus: int, dashboard: bool, log_to_driver: bool = True) -> None:
    """Join the cluster at `address`, or start a local Ray instance of `num_cpus` CPUs on this machine only."""
    import ray

    if address:
        ray.init(address=address, namespace="radrl", log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, namespace="radrl", include_dashboard=dashboard, log_to_driver=log_to_driver,
                 _node_ip_address="127.0.0.1", configure_logging=False)


class RayCluster:
    """A connection to Ray (a new local instance, or `orchestration.address`) plus the run's Ray metrics."""

    name = "ray"

    def __init__(self, cfg: ExperimentConfig):
        import ray
        from ray.util import metrics

        self.ray = ray
        init_ray(cfg.orchestration.address, max(os.cpu_count() or 1, required_cpus(cfg)), cfg.orchestration.dashboard)
        self.placement_group = None
        self.samples = metrics.Counter("radrl_samples_generated", "images (cxrl: policy and anchor) or reports (rrg) sampled")
        self.iteration = metrics.Gauge("radrl_iteration", "completed training iterations")
        self.reward = metrics.Gauge("radrl_reward_total", "mean reward of the last iteration")
        self.stage_seconds = metrics.Gauge("radrl_stage_seconds", "seconds per stage of the last iteration",
                                           tag_keys=("stage",))

    def get(self, refs):
        return self.ray.get(refs)

    def put(self, value):
        return self.ray.put(value)

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
