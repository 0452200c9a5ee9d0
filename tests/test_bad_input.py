"""Bad input, decided: non-finite rewards are dropped and counted (up to a bound), empty and over-long reports go
through (truncation counted), a cluster too small or unreachable is named in one message, and bootstrap does not
delete a folder it did not write."""

import socket
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from radrl.bootstrap import check_replaceable
from radrl.cli import app
from radrl.config import load_config
from radrl.faults import fault_point
from radrl.learner.ddpo import finite_rows
from radrl.learner.ddpo_learner import DDPOLearner
from radrl.models.weights import EMBEDDED_DIR
from radrl.orchestration.actors import ClusterUnreachable, check_reachable, resource_shortage
from radrl.reward_actors.scorer import RewardScorer
from radrl.rollout.worker import RolloutWorker

REPORTS = ["Heart size is enlarged. Small right pleural effusion.", "No acute cardiopulmonary abnormality.",
           "Left lower lobe consolidation.", "Small right pneumothorax."]


def tiny_config(**overrides):
    base = {"rollout.num_steps": 3, "rollout.batch_size": 4, "learner.batch_size": 2, "learner.stat_buffer_size": 4,
            "learner.stat_min_count": 2}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_finite_rows_drops_non_finite_rewards_and_log_probs_up_to_the_bound():
    log_probs = np.zeros((4, 3))
    log_probs[2, 1] = np.nan
    keep = finite_rows(np.array([1.0, np.inf, 0.5, 0.0]), log_probs, max_fraction=0.5)
    assert keep.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="2 of 4 samples .*max_nonfinite_fraction = 0.25; nothing was trained"):
        finite_rows(np.array([1.0, np.inf, 0.5, 0.0]), log_probs, max_fraction=0.25)


def test_a_nan_reward_drops_that_sample_and_too_many_change_nothing():
    cfg = tiny_config()
    learner = DDPOLearner(cfg)
    worker = RolloutWorker(cfg)
    worker.load_weights(learner.publish())
    trajectory, _ = worker.sample(REPORTS, seed=0, with_anchor=False)
    metrics = learner.update(np.array([1.0, np.nan, 0.5, -0.5]), trajectory)
    assert metrics["dropped_nonfinite"] == 1 and metrics["trajectories"] == 3 and learner.version == 1
    assert all(torch.isfinite(p).all() for p in learner.trainable_parameters())

    worker.load_weights(learner.publish())
    trajectory, _ = worker.sample(REPORTS, seed=1, with_anchor=False)
    before = {k: v.clone() for k, v in learner.policy.trainable_state().items()}
    with pytest.raises(ValueError, match="3 of 4 samples"):
        learner.update(np.array([np.nan, np.nan, np.nan, 1.0]), trajectory)
    assert learner.version == 1  # nothing was written from that batch
    assert all(torch.equal(v, before[k]) for k, v in learner.policy.trainable_state().items())


def test_a_non_finite_image_gets_a_nan_score_and_the_others_are_scored():
    cfg = tiny_config()
    images = torch.rand(2, 1, 32, 32)
    clean = {name: RewardScorer(cfg, name).score_images(images, REPORTS[:2]) for name in ("align", "diag", "consist")}
    images[1, 0, 3, 4] = float("nan")
    for name, expected in clean.items():
        scores = RewardScorer(cfg, name).score_images(images, REPORTS[:2])
        assert scores[0] == pytest.approx(expected[0]) and np.isnan(scores[1]), name


def test_empty_and_over_long_reports_are_sampled_and_scored_with_the_truncation_counted():
    cfg = tiny_config()
    worker = RolloutWorker(cfg)
    worker.load_weights(DDPOLearner(cfg).publish())
    long_report = " ".join(["Moderate right pleural effusion with adjacent atelectasis."] * 60)
    _, rollout = worker.sample(["", long_report], seed=0, with_anchor=True)
    assert rollout.truncated == 1 and torch.isfinite(rollout.policy_images).all()
    for name in ("align", "diag", "consist"):
        scored = RewardScorer(cfg, name).score(rollout)
        assert np.isfinite(scored.policy[1]) and np.isfinite(scored.anchor[1]), name  # read up to its limit
        # the empty report: no text to judge the image by (NaN: the learner drops the sample and counts it)
        assert np.isnan(scored.policy[0]) and np.isnan(scored.anchor[0]), name


def test_bootstrap_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        check_replaceable(tmp_path / "mine")
    check_replaceable(tmp_path / "mine", force=True)
    check_replaceable(tmp_path / "empty")  # absent, or empty: fine
    check_replaceable(EMBEDDED_DIR)  # bootstrap's own models: replaced once the new ones are written
    result = CliRunner().invoke(app, ["bootstrap", "--quick", "--out", str(tmp_path / "mine")])
    assert result.exit_code == 1 and "--force" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_resource_message_names_each_role_the_totals_and_the_keys():
    cfg = tiny_config(**{"rollout.num_workers": 2, "rollout.resources": "{num_cpus: 2, num_gpus: 1}"})
    assert resource_shortage(cfg, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}) is None
    message = resource_shortage(cfg, {"CPU": 16.0}, {"CPU": 16.0})
    assert "not enough GPU in total" in message and "rollout 2 × (2 CPU, 1 GPU)" in message
    assert "The cluster has 16 CPU, 0 GPU" in message and "--num-rollout-workers" in message
    big = tiny_config(**{"learner.resources": "{num_cpus: 8}"})
    message = resource_shortage(big, {"CPU": 12.0}, {"CPU": 4.0}, nodes=3)
    assert "one learner actor needs 8 CPU" in message and "on 3 node(s), the largest 4 CPU" in message


def test_an_address_nothing_listens_on_fails_in_seconds_with_what_to_check():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.perf_counter()
    with pytest.raises(ClusterUnreachable, match=f"cannot reach a Ray cluster at 127.0.0.1:{port} .*ray status"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - start < 10
    result = CliRunner().invoke(app, ["train", "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == 1 and "cannot reach a Ray cluster" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # one line, no traceback


def test_a_malformed_fault_spec_is_refused(monkeypatch):
    monkeypatch.setenv("RADRL_INJECT_FAULT", "learner:update")
    with pytest.raises(ValueError, match="role:method:call"):
        fault_point("learner", "update")
