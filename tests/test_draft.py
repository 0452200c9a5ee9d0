"""Reward backpropagation (learner.algorithm: draft): the surrogate of r_diag, where gradients go, the replay of the
worker's last K steps, and the same first update on Ray and in-process."""

import json
import math

import numpy as np
import pytest
import torch

from radrl.checkpoints import latest_checkpoint, load_checkpoint
from radrl.learner.draft import DifferentiableRewards, diagnostic_log_likelihood
from radrl.learner.draft_learner import DraftLearner
from radrl.reward_actors.rewards import diagnostic_accuracy, diagnostic_balanced_accuracy
from radrl.rollout.worker import RolloutWorker
from test_orchestration import history, small_config, train

NAN = float("nan")


def test_surrogate_is_the_log_likelihood_of_the_report_labels():
    # by hand: class 0 positive at p 0.4, class 1 negative at p 0.6 (log(1 − 0.6)), class 2 uncertain: not scored
    p = torch.tensor([[0.4, 0.6, 0.3]])
    targets = np.array([[1.0, 0.0, NAN]])
    assert float(diagnostic_log_likelihood(p, targets)) == pytest.approx((math.log(0.4) + math.log(0.4)) / 2)
    # balanced: positives and negatives averaged apart; here one of each, so the same; with two negatives not
    p3, t3 = torch.tensor([[0.4, 0.6, 0.2]]), np.array([[1.0, 0.0, 0.0]])
    assert float(diagnostic_log_likelihood(p3, t3, balanced=True)) == pytest.approx(
        (math.log(0.4) + (math.log(0.4) + math.log(0.8)) / 2) / 2)
    assert float(diagnostic_log_likelihood(p, np.array([[NAN, NAN, NAN]]))) == 0.0  # nothing scored


@pytest.mark.parametrize("balanced", [False, True])
def test_ascending_the_surrogate_raises_the_accuracy(balanced):
    # a case built by hand: both scored decisions wrong at the operating point 0.5 (positive read negative,
    # negative read positive), the uncertain class must not move
    logits = torch.tensor([[-0.4, 0.4, 1.0]], requires_grad=True)
    targets = np.array([[1.0, 0.0, NAN]])
    metric = diagnostic_balanced_accuracy if balanced else diagnostic_accuracy
    assert metric(torch.sigmoid(logits).detach().numpy(), targets)[0] == 0.0
    surrogate = diagnostic_log_likelihood(torch.sigmoid(logits), targets, balanced)
    (gradient,) = torch.autograd.grad(surrogate.sum(), logits)
    assert gradient[0, 0] > 0 and gradient[0, 1] < 0 and gradient[0, 2] == 0
    for _ in range(20):  # gradient ascent on the surrogate
        (step,) = torch.autograd.grad(diagnostic_log_likelihood(torch.sigmoid(logits), targets, balanced).sum(), logits)
        logits = (logits + 0.5 * step).detach().requires_grad_()
    assert metric(torch.sigmoid(logits).detach().numpy(), targets)[0] == 1.0


def draft_config(run_dir, **overrides):
    return small_config(run_dir, **{"learner.algorithm": "draft", "learner.draft_steps": 2, "rollout.num_steps": 3,
                                    "learner.anchor_penalty": 0.5, **overrides})


def test_gradients_reach_lora_and_ace_and_nothing_frozen(tmp_path):
    cfg = draft_config(tmp_path)
    learner, worker = DraftLearner(cfg), RolloutWorker(cfg)
    worker.load_weights(learner.publish())
    trajectory, _ = worker.sample(["Mild cardiomegaly. Small left pleural effusion.", "No acute disease."] * 2, 7,
                                  with_anchor=False)
    assert trajectory.noise.shape[:2] == (4, 2)  # the last K = 2 steps' normal draws travel with the chains
    frozen = {name: p.detach().clone() for name, p in learner.policy.named_parameters() if not p.requires_grad}
    rewards_before = {name: t.clone() for name, t in learner.rewards.state_dict().items()}
    # one hand-run forward/backward: every LoRA B and the ACE tokens get a gradient, nothing else has one
    from radrl.rollout.sampler import text_conditions

    chains = torch.arange(4)
    cond, uncond = text_conditions(learner.policy, list(trajectory.reports))
    learner.policy.models.scheduler.set_timesteps(cfg.rollout.num_steps)
    x0, penalty = learner.replay(trajectory, chains, cond, uncond)
    reward, _ = learner.rewards(learner.policy.models.decode(x0), list(trajectory.reports))
    (-reward.mean() + penalty.mean()).backward()
    trainable = dict(learner.policy.named_parameters())
    lora_b = [name for name in trainable if "lora_B" in name]
    assert lora_b and all(trainable[name].grad is not None and trainable[name].grad.abs().sum() > 0 for name in lora_b)
    assert learner.policy.ace.grad is not None and learner.policy.ace.grad.abs().sum() > 0
    assert all(p.grad is None for p in learner.policy.parameters() if not p.requires_grad)
    assert all(p.grad is None for p in learner.rewards.parameters())
    learner.optimizer.zero_grad(set_to_none=True)

    metrics = learner.update(np.zeros(4), trajectory)
    assert metrics["replay_error"] < 1e-5  # the learner's replay is the worker's chain under the same weights
    assert metrics["optimizer_steps"] == 1 and metrics["anchor_penalty"] >= 0
    after = dict(learner.policy.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    assert all(torch.equal(learner.rewards.state_dict()[name], value) for name, value in rewards_before.items())
    changed = [name for name in lora_b if after[name].detach().abs().sum() > 0]
    assert changed and learner.version == 1


def test_a_draft_run_logs_its_learner_held_out_curves_and_keeps_to_its_budget(tmp_path):
    _, results = train(draft_config(tmp_path, **{"learner.iterations": 50, "learner.time_budget_minutes": 0.001,
                                                 "logging.eval_every": 1}))
    assert results["iterations"] == 1 and results["algorithm"] == "draft"  # the budget stopped it after one
    (row,) = history(tmp_path)
    assert {"draft/reward", "draft/replay_error", "draft/anchor_penalty", "heldout/total", "heldout/auroc",
            "time/train_seconds", "time/images"} <= set(row)
    assert row["time/images"] == results["images_generated"] > 0


@pytest.mark.slow
def test_a_draft_run_on_ray_makes_the_same_first_update_as_in_process(tmp_path):
    pytest.importorskip("ray")
    for where, local in (("local", True), ("ray", False)):
        train(draft_config(tmp_path / where, **{"learner.iterations": 1, "orchestration.local": local}))
    tensors = {where: load_checkpoint(latest_checkpoint(tmp_path / where))[0] for where in ("local", "ray")}
    # The rollout and the learner run in other processes with other thread counts on Ray, so sums are ordered
    # differently. AdamW's first step is about ±lr per entry whatever the gradient's size, so an entry whose
    # gradient is near 0 can step either way: compare the update's gradient itself, which the optimizer's first
    # moment holds (0.1 × the clipped gradient after one step), as one vector.
    moments = [name for name in tensors["local"] if name.endswith("/exp_avg")]
    assert moments
    local, ray = (torch.cat([tensors[where][name].flatten() for name in moments]) for where in ("local", "ray"))
    assert local.norm() > 0
    assert float((ray - local).norm() / local.norm()) < 1e-2
    assert history(tmp_path / "ray")[0]["draft/reward"] == pytest.approx(history(tmp_path / "local")[0]["draft/reward"],
                                                                          rel=1e-4)


def test_compare_learners_writes_the_table_the_per_minute_figures_and_the_curves(tmp_path):
    from radrl.config import load_config
    from radrl.orchestration.ablate import run_ablation

    settings = ["rollout.num_steps=2", "rollout.batch_size=4", "learner.batch_size=4", "learner.stat_buffer_size=4",
                "learner.stat_min_count=2", "learner.time_budget_minutes=0.001", "logging.eval_reports=8",
                "logging.eval_every=1", "evaluation.reports=16", "evaluation.diversity_reports=2",
                "evaluation.diversity_samples=2"]
    cfg = load_config("configs/compare_learners_tiny.yaml", settings)
    tables = run_ablation({"learners": cfg}, 1, tmp_path, local=True, only=("anchor", "ddpo", "draft_k1"),
                          kinds={"learners": "learners"})
    assert "Learners at equal wall-clock budget" in tables and "AUROC gap closed" in tables
    for row in ("DDPO (the paper's learner)", "DRaFT-1", "| ddpo (1 seeds)", "| draft_k1 (1 seeds)"):
        assert row in tables, row
    assert (tmp_path / "learners" / "curves.png").is_file()
    cells = {c["variant"]: c for c in json.loads((tmp_path / "ablation.json").read_text())}
    assert cells["draft_k1"]["training"]["iterations"] == 1.0  # the budget, not learner.iterations, ended it
    assert cells["draft_k1"]["real"]["auroc"] > 0.5  # the reports' own phantoms: the ceiling of "gap closed"


def test_r_align_has_a_finite_gradient_at_the_upright_pose():
    from radrl.models.posture import r_align

    upright = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]], requires_grad=True)  # t = 0: sqrt's gradient would be NaN
    r_align(upright).sum().backward()
    assert torch.isfinite(upright.grad).all()
    posture = torch.tensor([[1.1, 0.95, 0.03, -0.04, 0.2]])
    assert float(r_align(posture)) == pytest.approx(-(0.1 + 0.2 / (2 * math.pi) + 0.05), abs=1e-6)
