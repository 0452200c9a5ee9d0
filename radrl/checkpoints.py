"""Checkpoints: safetensors for tensors, JSON for the rest, each written atomically as one folder.

    <run_dir>/checkpoints/iter_000010/{tensors.safetensors, state.json, checksums.json}

The folder is written under a temporary name, its files flushed to disk (fsync), and renamed into
place, so a crash mid-write never leaves a half checkpoint that `--resume` would pick up. Replacing
an existing checkpoint moves the old one aside first and deletes it only once the new one is in
place; if a crash falls between the two renames, `latest_checkpoint` puts the old one back.

checksums.json holds each file's SHA-256: a truncated or altered file is found on load and named, and
`valid_checkpoint` (what --resume and learner recovery use) falls back to the newest older checkpoint that is whole.
Only the newest `logging.keep_checkpoints` are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from radrl.config import with_current_defaults
from radrl.faults import fault_point

log = logging.getLogger("radrl")

PREFIX = "iter_"
FILES = ("tensors.safetensors", "state.json")
CHECKSUMS = "checksums.json"
REPLACED = ".replaced-"  # an old checkpoint moved aside while its replacement is renamed in


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder's fsync makes its renames durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class CorruptCheckpoint(ValueError):
    """A checkpoint file is missing, truncated or does not match its checksum."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, iteration: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep: int = 0, protect: tuple[int, ...] = ()) -> Path:
    """Write checkpoint `iteration` atomically and durably, with checksums; then delete all but the newest `keep`
    (0: keep all) and those of the iterations in `protect`. Returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{iteration:06d}"
    final, replaced = root / name, root / f"{REPLACED}{name}"
    staging = root / f".tmp-{name}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):  # half-written folders of a process that died (one writer per run folder)
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "tensors.safetensors")
    fault_point("driver", "checkpoint_write")  # fault injection: the process dies with the folder half written
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    (staging / CHECKSUMS).write_text(json.dumps({name: _sha256(staging / name) for name in FILES}, indent=1))
    for path in (*(staging / name for name in (*FILES, CHECKSUMS)), staging):
        _fsync(path)
    if final.exists():  # re-saving the same iteration (e.g. after an interrupted run): the old one aside first
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync(root)
    shutil.rmtree(replaced, ignore_errors=True)
    if keep:
        kept = {f"{PREFIX}{i:06d}" for i in protect}
        for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())[:-keep]:
            if old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None (an old one left aside by a crash mid-replace
    is put back first)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for aside in root.glob(f"{REPLACED}{PREFIX}*"):
        final = root / aside.name.removeprefix(REPLACED)
        if final.exists():
            shutil.rmtree(aside)  # the replacement made it: the old copy is garbage
        else:
            os.replace(aside, final)
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file())
    return found[-1] if found else None


def verify_checkpoint(folder: Path) -> None:
    """Raise CorruptCheckpoint naming the file if one is missing or differs from its recorded SHA-256 (checkpoints
    written before checksums were kept are checked for presence only)."""
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise CorruptCheckpoint(f"checkpoint {folder} has no {name}")
    if not (folder / CHECKSUMS).is_file():
        return
    try:
        expected = json.loads((folder / CHECKSUMS).read_text())
    except json.JSONDecodeError as error:
        raise CorruptCheckpoint(f"checkpoint {folder}: {CHECKSUMS} is not valid JSON ({error})") from None
    for name, digest in expected.items():
        if (actual := _sha256(folder / name)) != digest:
            size = (folder / name).stat().st_size
            raise CorruptCheckpoint(f"checkpoint {folder}: {name} ({size} bytes) does not match its checksum "
                                    f"(SHA-256 {actual[:12]}…, recorded {digest[:12]}…): truncated or altered")


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder, verified against its checksums; CorruptCheckpoint names the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder {folder}")
    verify_checkpoint(folder)
    try:
        tensors = load_file(folder / "tensors.safetensors")
    except Exception as error:  # safetensors' own error for a truncated header or body
        raise CorruptCheckpoint(f"checkpoint {folder}: tensors.safetensors cannot be read ({error})") from None
    try:
        state = json.loads((folder / "state.json").read_text())
    except json.JSONDecodeError as error:
        raise CorruptCheckpoint(f"checkpoint {folder}: state.json is not valid JSON ({error})") from None
    return tensors, state


def valid_checkpoint(run_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint of a run that loads whole, with its (tensors, state); a corrupt newer one is reported
    and skipped. None if the run has no checkpoint; CorruptCheckpoint if none of them is whole."""
    latest_checkpoint(run_dir)  # puts back a checkpoint left aside by a crash mid-replace
    root = Path(run_dir) / "checkpoints"
    folders = sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir()), reverse=True) if root.is_dir() else []
    problems = []
    for folder in folders:
        try:
            tensors, state = load_checkpoint(folder)
        except CorruptCheckpoint as error:
            problems.append(str(error))
            log.warning("%s; falling back to the checkpoint before it", error)
            continue
        return folder, tensors, state
    if problems:
        raise CorruptCheckpoint("no whole checkpoint to resume from: " + "; ".join(problems))
    return None


# Settings a resumed run may change: where and how big it runs, not what it learns.
RESUMABLE_CHANGES = ("learner.iterations", "learner.time_budget_minutes", "orchestration.", "logging.", "evaluation.",
                     "rollout.num_workers", ".resources.", "rewards.replicas")


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {'section.key': value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def training_changes(saved: dict, current: dict) -> str:
    """The settings (first five, 'key: old → new') in which `current` trains something else than `saved`; '' if none.
    Options either side lacks (a config written before they existed) count at their defaults."""
    old, new = flatten(with_current_defaults(saved)), flatten(with_current_defaults(current))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
               and not any(k.startswith(p) or p in k for p in RESUMABLE_CHANGES)]
    return ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in changed[:5])


def check_resumable(saved: dict, current: dict) -> None:
    """Refuse to resume under a config that changes what is being trained."""
    if details := training_changes(saved, current):
        raise ValueError(f"--resume: the config differs from the checkpoint's in what is trained ({details}); "
                         "resume with the original config or start a new run_dir")
