"""`radrl step-gradients`: each denoising step's share of a DDPO update, on the shipped tiny model."""

import pytest

from radrl.config import load_config
from radrl.learner.step_gradients import format_step_gradients, step_gradient_norms


@pytest.mark.slow
def test_the_nearly_noise_free_steps_dominate_the_gradient_of_the_shipped_model():
    cfg = load_config("configs/cxrl_tiny.yaml", ["rollout.batch_size=4", "learner.batch_size=4",
                                                 "rollout.samples_per_report=2", "rollout.anchor_samples_per_report=1"])
    rows = step_gradient_norms(cfg, batches=1)
    assert [r["step"] for r in rows] == list(range(cfg.rollout.num_steps))
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["trained"] for r in rows] == [r["t"] >= cfg.learner.min_train_timestep for r in rows]
    assert all(a["t"] > b["t"] and a["sigma"] > b["sigma"] for a, b in zip(rows, rows[1:]))  # σ_t falls with t
    # what learner.min_train_timestep is for: the steps it leaves out carry most of the update's noise
    left_out = sum(r["share"] for r in rows if not r["trained"])
    assert left_out > 0.5, format_step_gradients(rows)
    assert "| 0 | 901 |" in format_step_gradients(rows)
