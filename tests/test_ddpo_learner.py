"""The DDPO learner: only LoRA + ACE change, versions count updates, stale data is refused, state round-trips."""

import numpy as np
import pytest
import torch

from dataclasses import replace

from radrl.config import load_config, with_overrides
from radrl.learner.ddpo_learner import DDPOLearner
from radrl.rollout.worker import RolloutWorker

REPORTS = ["Heart size is enlarged. Small right pleural effusion.", "No acute cardiopulmonary abnormality.",
           "Left lower lobe consolidation.", "Small right pneumothorax."]


def tiny_config(**overrides):
    base = {"rollout.num_steps": 3, "rollout.batch_size": 4, "learner.batch_size": 2, "learner.ace_lr": 1e-2,
            "learner.stat_buffer_size": 4, "learner.stat_min_count": 2, "learner.timestep_fraction": 0.67}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def sampled_batch(cfg, learner):
    worker = RolloutWorker(cfg)
    worker.load_weights(learner.publish())
    trajectory, _ = worker.sample(REPORTS, seed=0, with_anchor=False)
    return trajectory


def test_update_changes_lora_and_ace_and_nothing_else():
    cfg = tiny_config()
    learner = DDPOLearner(cfg)
    trajectory = sampled_batch(cfg, learner)
    before = {name: p.detach().clone() for name, p in learner.policy.named_parameters()}
    buffers = {name: b.clone() for name, b in learner.policy.named_buffers()}
    metrics = learner.update(np.array([1.0, -1.0, 0.5, -0.5]), trajectory)
    changed = {name for name, p in learner.policy.named_parameters() if not torch.equal(p, before[name])}
    assert "ace" in changed and any("lora_" in name for name in changed)
    assert all(name == "ace" or "lora_" in name for name in changed)
    for name, p in learner.policy.named_parameters():  # every frozen tensor bit-identical
        if name != "ace" and "lora_" not in name:
            assert torch.equal(p, before[name]), name
    assert all(torch.equal(b, buffers[name]) for name, b in learner.policy.named_buffers())
    assert learner.version == 1 and metrics["weight_version"] == 1
    assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])
    # two minibatches of 2: the second ran after the first's step, so its ratio left 1
    assert metrics["approx_kl"] > 0


def test_ace_has_its_own_learning_rate():
    learner = DDPOLearner(tiny_config())
    lrs = [group["lr"] for group in learner.optimizer.param_groups]
    assert lrs == [3e-4, 1e-2]
    assert learner.optimizer.param_groups[1]["params"][0] is learner.policy.ace


def test_trajectories_from_an_old_version_are_refused():
    cfg = tiny_config()
    learner = DDPOLearner(cfg)
    trajectory = sampled_batch(cfg, learner)
    learner.update(np.zeros(4) + np.arange(4), trajectory)
    with pytest.raises(ValueError, match="weight version 0 given to the learner at version 1"):
        learner.update(np.arange(4.0), trajectory)


def test_published_weights_are_the_adapter_tensors_only():
    learner = DDPOLearner(tiny_config())
    published = learner.publish()
    unet_bytes = sum(p.numel() * p.element_size() for p in learner.policy.unet.parameters())
    assert set(published.tensors) == set(learner.policy.trainable_state())
    assert 0 < published.nbytes < 0.05 * unet_bytes


def test_state_round_trip_reproduces_the_next_update():
    cfg = tiny_config()
    first = DDPOLearner(cfg)
    trajectory = sampled_batch(cfg, first)
    first.update(np.arange(4.0), trajectory)
    tensors, meta = first.state()
    second = DDPOLearner(cfg)
    second.load_state(tensors, meta)
    assert second.version == 1
    assert all(torch.equal(a, b) for a, b in zip(first.trainable_parameters(), second.trainable_parameters()))
    # the next update (same data, same generator state) lands on identical weights
    worker = RolloutWorker(cfg)
    worker.load_weights(first.publish())
    batch, _ = worker.sample(REPORTS, seed=1, with_anchor=False)
    first.update(np.arange(4.0), batch)
    second.update(np.arange(4.0), batch)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first.trainable_parameters(), second.trainable_parameters()))


def test_min_train_timestep_leaves_the_last_steps_out_of_the_gradient():
    cfg = tiny_config(**{"learner.timestep_fraction": 1.0, "learner.batch_size": 4})
    trajectory = sampled_batch(cfg, DDPOLearner(cfg))
    # the last step (x_1 → x_0) is the only one that reads the final latents: corrupt them
    latents = trajectory.latents.clone()
    latents[:, -1] += 0.5 * torch.randn_like(latents[:, -1])
    corrupted = replace(trajectory, latents=latents)
    rewards = np.array([1.0, -1.0, 0.5, -0.5])

    def updated(min_train_timestep, batch):
        learner = DDPOLearner(with_overrides(cfg, [f"learner.min_train_timestep={min_train_timestep}"]))
        learner.update(rewards, batch)
        return learner.trainable_parameters()

    above_last = int(trajectory.timesteps[-2])  # steps at t ≥ this: all but the last
    assert all(torch.equal(a, b) for a, b in zip(updated(above_last, trajectory), updated(above_last, corrupted)))
    assert not all(torch.equal(a, b) for a, b in zip(updated(0, trajectory), updated(0, corrupted)))
    with pytest.raises(ValueError, match="leaves no denoising step to train"):  # refused when the learner starts
        DDPOLearner(with_overrides(cfg, ["learner.min_train_timestep=1001"]))


def brightness_after_training(sign: float, iterations: int = 12) -> tuple[float, float]:
    """Mean brightness of fixed-noise samples before and after DDPO on reward = sign × brightness."""
    cfg = tiny_config(**{"rollout.num_steps": 4, "rollout.batch_size": 8, "learner.batch_size": 8, "learner.lr": 1e-2,
                         "learner.ace_lr": 1e-2, "learner.per_prompt_stats": False, "learner.timestep_fraction": 1.0})
    learner, worker = DDPOLearner(cfg), RolloutWorker(cfg)
    worker.load_weights(learner.publish())
    probe = REPORTS * 2

    def brightness() -> float:
        return float(worker.sample(probe, seed=999, with_anchor=False)[1].policy_images.mean())

    before = brightness()
    for iteration in range(iterations):
        trajectory, view = worker.sample(probe, seed=iteration, with_anchor=False)
        learner.update(sign * view.policy_images.mean(dim=(1, 2, 3)).double().numpy(), trajectory)
        worker.load_weights(learner.publish())
    return before, brightness()


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ddpo_climbs_a_simple_reward_in_either_direction(sign):
    before, after = brightness_after_training(sign)
    assert sign * (after - before) > 0.03, (before, after)


def test_a_non_finite_gradient_in_a_later_minibatch_undoes_the_whole_update():
    """Two minibatches: the first steps, the second's gradient is NaN. The learner must come back exactly as it
    was (weights, optimizer, advantage statistics), so that a retry is the update that would have happened."""
    cfg = tiny_config()
    learner, clean = DDPOLearner(cfg), DDPOLearner(cfg)
    trajectory = sampled_batch(cfg, learner)
    rewards = np.array([1.0, -1.0, 0.5, -0.5])
    before = [p.detach().clone() for p in learner.trainable_parameters()]
    calls = {"n": 0}

    def nan_after_first_minibatch(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] > 2 else grad  # 2 timesteps per minibatch: the 2nd is poisoned

    hook = learner.policy.ace.register_hook(nan_after_first_minibatch)
    with pytest.raises(FloatingPointError, match="undone whole"):
        learner.update(rewards, trajectory)
    hook.remove()
    assert calls["n"] > 2  # the first minibatch did step before the failure
    assert all(torch.equal(a, b) for a, b in zip(learner.trainable_parameters(), before))
    assert learner.version == 0 and learner.optimizer.state_dict()["state"] == {}  # no Adam moments from step 1
    assert all(len(buffer) == 0 for buffer in learner.tracker.buffers.values())  # rewards not counted
    learner.update(rewards, trajectory)  # the retry equals an update that never failed
    clean.update(rewards, trajectory)
    assert all(torch.equal(a, b) for a, b in zip(learner.trainable_parameters(), clean.trainable_parameters()))


def test_each_sample_trains_on_its_own_timesteps_and_per_chain_log_probs_match():
    from radrl.learner.ddpo_learner import sample_timesteps
    from radrl.rollout.sampler import step_log_prob, text_conditions

    eligible = torch.arange(10)
    steps = sample_timesteps(eligible, 5, 8, torch.Generator().manual_seed(0))
    assert steps.shape == (8, 5)
    assert all(len(set(row.tolist())) == 5 for row in steps)  # a subset without repeats per sample
    assert len({tuple(sorted(row.tolist())) for row in steps}) > 1  # not one subset for the minibatch
    cfg = tiny_config()
    learner = DDPOLearner(cfg)
    trajectory = sampled_batch(cfg, learner)
    cond, uncond = text_conditions(learner.policy, REPORTS)
    per_chain = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        mixed = step_log_prob(learner.policy, trajectory, per_chain, cond, uncond, cfg.rollout.eta,
                              cfg.rollout.guidance_scale)
        one_by_one = [step_log_prob(learner.policy, trajectory, int(s), cond, uncond, cfg.rollout.eta,
                                    cfg.rollout.guidance_scale)[i] for i, s in enumerate(per_chain)]
    assert torch.allclose(mixed, torch.stack(one_by_one), atol=1e-6)
    assert torch.allclose(mixed, trajectory.log_probs[torch.arange(4), per_chain], atol=1e-5)  # the recorded ones


def update_gradients(cfg) -> tuple[dict, list[list[torch.Tensor]]]:
    """One update on a sampled batch: its logged figures and the gradient each optimizer step took."""
    learner = DDPOLearner(cfg)
    trajectory = sampled_batch(cfg, learner)
    gradients, step = [], learner.optimizer.step

    def recorded_step(*args, **kwargs):
        gradients.append([p.grad.clone() for p in learner.trainable_parameters()])
        return step(*args, **kwargs)

    learner.optimizer.step = recorded_step
    return learner.update(np.array([1.0, -1.0, 0.5, -0.5]), trajectory), gradients


def test_gradient_checkpointing_gives_the_same_gradient():
    """learner.gradient_checkpointing recomputes the UNet's activations in the backward pass: memory, not math."""
    assert any(getattr(m, "gradient_checkpointing", False) for m in DDPOLearner(
        tiny_config(**{"learner.gradient_checkpointing": True})).policy.unet.modules())
    _, plain = update_gradients(tiny_config())
    _, checkpointed = update_gradients(tiny_config(**{"learner.gradient_checkpointing": True}))
    for ours_step, theirs_step in zip(checkpointed, plain, strict=True):
        for ours, theirs in zip(ours_step, theirs_step):
            torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-5)


def test_micro_batches_give_the_same_update_as_the_whole_minibatch():
    """learner.micro_batch_size (gradient accumulation) is memory only: the gradient each optimizer step takes and
    the logged figures are the whole minibatch's."""
    whole, whole_gradients = update_gradients(tiny_config(**{"learner.batch_size": 4}))
    micro, micro_gradients = update_gradients(tiny_config(**{"learner.batch_size": 4, "learner.micro_batch_size": 1}))
    assert len(whole_gradients) == len(micro_gradients) == 1  # one optimizer step either way
    # the UNet's kernels sum in another order at another batch size, and the DDIM log-prob's 1/σ² amplifies that:
    # 2e-4 of the gradient's norm here; a wrong micro-batch weighting would be off by tens of percent
    for ours, theirs in zip(micro_gradients[0], whole_gradients[0]):
        assert float((ours - theirs).norm()) <= 1e-3 * float(theirs.norm())  # (LoRA A: 0 while B is 0)
    for key in ("approx_kl", "clipfrac", "grad_norm"):
        assert micro[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-6), key
    # the loss is a mean of ±|A|·ρ terms whose advantages sum to 0: its ~1e-6 remainder is float cancellation, and
    # moves with the thread count; compare it on the scale of its terms
    assert abs(micro["loss"] - whole["loss"]) <= 1e-5 * whole["advantage_abs"]
