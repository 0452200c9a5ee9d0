"""Progress bars: drawn where a person watches (a terminal), silent in logs and pipes."""

import io
import sys

import torch

from radrl.config import load_config
from radrl.eval.cxrl_eval import generate
from radrl.learner.ddpo_learner import DDPOLearner
from radrl.progress import progress
from radrl.rollout.worker import RolloutWorker


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal_and_not_in_a_pipe(monkeypatch):
    terminal, pipe = Terminal(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress(range(3), desc="cells", unit="cell")) == [0, 1, 2]
    assert "cells:" in terminal.getvalue() and "/3 [" in terminal.getvalue()  # (cleared when done: leave=False)
    monkeypatch.setattr(sys, "stderr", pipe)
    list(progress(range(3), desc="cells"))
    assert pipe.getvalue() == ""


def test_eval_sampling_shows_its_batches(monkeypatch):
    cfg = load_config(None, ["rollout.num_steps=2", "rollout.batch_size=2", "learner.batch_size=2"])
    worker = RolloutWorker(cfg)
    worker.load_weights(DDPOLearner(cfg).publish())
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    images = generate(worker, ["No acute disease.", "Small left effusion.", "Cardiomegaly."], seed=0, model="policy")
    assert images.shape[0] == 3 and torch.isfinite(images).all()
    assert "sampling policy:" in terminal.getvalue() and "/2 [" in terminal.getvalue()
