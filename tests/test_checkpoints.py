"""Checkpoint folders: written whole or not at all, and a replace that a crash interrupts loses nothing."""

import os

import pytest
import torch

from radrl import checkpoints
from radrl.checkpoints import (CorruptCheckpoint, latest_checkpoint, load_checkpoint, save_checkpoint,
                                            valid_checkpoint)


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


def test_a_corrupt_checkpoint_is_named_and_resume_falls_back_to_the_one_before(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(64)}, {"iteration": 1})
    newest = save_checkpoint(tmp_path, 2, {"w": torch.ones(64)}, {"iteration": 2})
    data = (newest / "tensors.safetensors").read_bytes()
    (newest / "tensors.safetensors").write_bytes(data[:-40])  # truncated, as by a full disk or a killed copy
    with pytest.raises(CorruptCheckpoint, match="tensors.safetensors .* does not match its checksum"):
        load_checkpoint(newest)
    folder, tensors, state = valid_checkpoint(tmp_path)
    assert folder.name == "iter_000001" and state == {"iteration": 1} and torch.equal(tensors["w"], torch.zeros(64))
    (folder / "state.json").write_text('{"iteration": 7}')  # altered
    with pytest.raises(CorruptCheckpoint, match="no whole checkpoint .*state.json"):
        valid_checkpoint(tmp_path)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for i in range(1, 6):
        save_checkpoint(tmp_path, i, {"w": torch.zeros(1)}, {"iteration": i}, keep=2, protect=(2,))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000002", "iter_000004",
                                                                          "iter_000005"]
