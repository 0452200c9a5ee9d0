"""Checkpoint folders: written whole or not at all, and a replace that a crash interrupts loses nothing."""

import os

import pytest
import torch

from radrl.orchestration import checkpoints
from radrl.orchestration.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint


def test_save_and_load_round_trip(tmp_path):
    folder = save_checkpoint(tmp_path, 3, {"w": torch.arange(4.0)}, {"iteration": 3})
    tensors, state = load_checkpoint(folder)
    assert torch.equal(tensors["w"], torch.arange(4.0)) and state == {"iteration": 3}
    assert latest_checkpoint(tmp_path) == folder
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter_000003"]  # no staging left


def test_a_crash_while_replacing_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(2)}, {"version": "old"})
    real_replace = os.replace

    def crash_on_rename_in(source, target):
        if ".tmp-" in str(source):  # the new folder's rename into place: the process dies here
            raise KeyboardInterrupt("killed")
        return real_replace(source, target)

    monkeypatch.setattr(checkpoints.os, "replace", crash_on_rename_in)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 5, {"w": torch.ones(2)}, {"version": "new"})
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    assert not (tmp_path / "checkpoints" / "iter_000005").exists()  # moved aside, not deleted
    folder = latest_checkpoint(tmp_path)  # puts it back
    assert folder.name == "iter_000005" and load_checkpoint(folder)[1] == {"version": "old"}
    save_checkpoint(tmp_path, 5, {"w": torch.ones(2)}, {"version": "new"})  # a replace that completes
    assert load_checkpoint(latest_checkpoint(tmp_path))[1] == {"version": "new"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "iter_000005"
    assert not list((tmp_path / "checkpoints").glob(".replaced-*"))
