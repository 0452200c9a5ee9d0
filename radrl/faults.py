"""Fault injection: make a chosen process die at a chosen point, for the recovery tests (tests/test_faults.py).

    RADRL_INJECT_FAULT="rollout-1:sample:2:after,learner:update:3"   RADRL_FAULT_DIR=/some/folder

Each entry is `role:method:call[:when]`: the process of that role (`rollout-<i>`, `reward-<name>-<r>`, `learner`, or
`driver` for the `radrl train` process itself) exits with os._exit — no cleanup, as a crash, an OOM kill or a lost
node would — at its `call`-th call of `method`, `before` the method runs (default) or `after` it has computed its
result but before returning it. A marker file in RADRL_FAULT_DIR makes each entry fire once, so the replacement of a
killed actor does not die again. Unset, nothing here runs.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections import Counter

FAULT_ENV = "RADRL_INJECT_FAULT"
FAULT_DIR_ENV = "RADRL_FAULT_DIR"
ROLE_ENV = "RADRL_ROLE"  # set in each actor: its role key
EXIT_CODE = 43

_calls: Counter = Counter()


def _entries(role: str, method: str) -> list[tuple[str, int, str]]:
    entries = []
    for entry in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        parts = entry.strip().split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"{FAULT_ENV} entry {entry!r}: expected role:method:call[:before|after]")
        when = parts[3] if len(parts) == 4 else "before"
        if parts[0] == role and parts[1] == method:
            entries.append((entry.strip(), int(parts[2]), when))
    return entries


def _fire(entry: str) -> None:
    folder = os.environ.get(FAULT_DIR_ENV)
    if folder:
        try:  # the first process to get here creates the marker; later ones (replacements) do not fire
            os.close(os.open(os.path.join(folder, entry.replace(":", "_") + ".fired"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    os._exit(EXIT_CODE)


def fault_point(role: str, method: str, when: str = "before") -> None:
    """Die here if an injected fault says so (count this call first when `when` is 'before')."""
    if FAULT_ENV not in os.environ:
        return
    if when == "before":
        _calls[(role, method)] += 1
    for entry, call, entry_when in _entries(role, method):
        if entry_when == when and _calls[(role, method)] == call:
            _fire(entry)


def with_fault_points(cls: type) -> type:
    """`cls` with a fault point around each public method (the role key comes from RADRL_ROLE in the actor); `cls`
    itself when no fault is injected."""
    if FAULT_ENV not in os.environ:
        return cls

    def wrap(name, function):
        @functools.wraps(function)
        def method(self, *args, **kwargs):
            role = os.environ.get(ROLE_ENV, "")
            fault_point(role, name, "before")
            result = function(self, *args, **kwargs)
            fault_point(role, name, "after")
            return result
        return method

    methods = {name: wrap(name, f) for name, f in inspect.getmembers(cls, inspect.isfunction)
               if not name.startswith("_") and not isinstance(inspect.getattr_static(cls, name), staticmethod)}
    return type(cls.__name__, (cls,), methods)
