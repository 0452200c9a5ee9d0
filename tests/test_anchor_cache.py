"""The anchor score cache: recurring (report, x_T seed) pairs, batch-independent anchor images, cached = fresh."""

import numpy as np
import pytest
import torch

from radrl.config import ConfigError, load_config
from radrl.models.diffusion_policy import PublishedWeights
from radrl.orchestration.actors import start_roles
from radrl.orchestration.driver import CXRLTrainer
from radrl.reward_actors.anchor_cache import AnchorCache, iteration_noise_seeds, pair_seed
from radrl.reward_actors.scorer import RewardScorer
from radrl.rollout.worker import RolloutWorker

CACHED = {"rollout.num_steps": 2, "rollout.batch_size": 4, "rollout.samples_per_report": 2, "learner.batch_size": 4,
          "learner.iterations": 3, "learner.stat_buffer_size": 4, "learner.stat_min_count": 2, "data.n_train": 2,
          "rollout.noise_seeds_per_report": 2, "rollout.anchor_cache": True, "logging.eval_reports": 4,
          "logging.image_every": 10, "logging.checkpoint_every": 10, "orchestration.local": True}


def config(run_dir, **overrides):
    settings = dict(CACHED, **{"logging.run_dir": str(run_dir)}, **overrides)
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def test_a_reports_samples_take_distinct_seeds_of_its_pool():
    reports = ["a", "a", "b", "b"]
    seeds = iteration_noise_seeds(reports, per_report=2, seed=0, iteration=5)
    assert seeds == iteration_noise_seeds(reports, 2, 0, 5)  # a function of (seed, iteration) only
    assert sorted(seeds[:2]) == sorted(pair_seed("a", j, 0) for j in range(2))
    assert sorted(seeds[2:]) == sorted(pair_seed("b", j, 0) for j in range(2))
    assert set(iteration_noise_seeds(reports, 3, 0, 6)) <= {pair_seed(r, j, 0) for r in "ab" for j in range(3)}


def test_cache_completes_rows_from_stored_scores_and_counts_hits():
    cache = AnchorCache()
    cache.store(["a"], [1], {"align": np.array([0.5])})
    assert cache.missing(["a", "b", "a"], [1, 1, 2]) == [1, 2]
    full = cache.complete(["a", "b", "a"], [1, 1, 2], [1, 2], {"align": np.array([0.1, 0.2])})
    assert full["align"].tolist() == [0.5, 0.1, 0.2] and (cache.hits, cache.misses) == (1, 2) and len(cache) == 3


def test_the_anchors_image_of_a_pair_does_not_depend_on_its_batch(tmp_path):
    worker = RolloutWorker(config(tmp_path))
    worker.load_weights(PublishedWeights(0, {k: v.numpy() for k, v in worker.policy.trainable_state().items()}))
    alone = worker.anchor_images(["Heart is normal."], [pair_seed("Heart is normal.", 0, 0)])
    batch = worker.anchor_images(["Large right pleural effusion.", "Heart is normal."],
                                 [pair_seed("Large right pleural effusion.", 1, 0), pair_seed("Heart is normal.", 0, 0)])
    assert torch.allclose(alone[0], batch[1], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)


def test_a_cached_run_samples_each_anchor_once_and_its_cached_scores_equal_fresh_ones(tmp_path):
    cfg = config(tmp_path)
    roles = start_roles(cfg)
    try:
        trainer = CXRLTrainer(cfg, roles)
        first = trainer.train_step()
        assert first["anchor/cache_hit_rate"] == 0.0 and first["anchor/cache_size"] == 4  # 2 reports × 2 seeds
        later = [trainer.train_step() for _ in range(2)]
        assert later[-1]["anchor/cache_hit_rate"] == pytest.approx(8 / 12)  # iterations 2 and 3 are all hits
        assert later[-1]["rollout/images"] == 4  # policy images only: no anchor was sampled
        worker, scorer = roles.workers[0].target, RewardScorer(cfg, "consist")
        pairs = list(trainer.anchor_cache.scores)
        fresh = scorer.score_images(worker.anchor_images([r for r, _ in pairs], [s for _, s in pairs]),
                                    [r for r, _ in pairs])
        cached = [trainer.anchor_cache.scores[p]["consist"] for p in pairs]
        assert np.allclose(fresh, cached, atol=1e-5)
    finally:
        roles.cluster.shutdown()


def test_precompute_fills_the_cache_before_the_first_iteration(tmp_path):
    cfg = config(tmp_path, **{"rollout.precompute_anchor": True, "learner.iterations": 1})
    roles = start_roles(cfg)
    try:
        trainer = CXRLTrainer(cfg, roles)
        trainer.run()
        assert len(trainer.anchor_cache) == 4
        assert trainer.tracker.history()[0]["anchor/cache_hit_rate"] == 1.0
    finally:
        roles.cluster.shutdown()


def test_cache_settings_are_checked():
    with pytest.raises(ConfigError, match="needs rollout.noise_seeds_per_report"):
        load_config(None, ["rollout.anchor_cache=true"])
    with pytest.raises(ConfigError, match="set rollout.anchor_cache=true"):
        load_config(None, ["rollout.precompute_anchor=true", "rollout.noise_seeds_per_report=2"])
