"""One calling convention for in-process and Ray roles, so the driver is the same code for both.

Ray: `handle.method.remote(*args)` returns an ObjectRef and `ray.get` resolves it. In-process
(`--local`) a `LocalHandle` wraps the plain object: `.remote` runs the method at once and returns
a `LocalRef` holding the result; `LocalCluster.get` unwraps it. No mock of Ray: nothing here
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LocalRef:
    """The already-computed result of an in-process call."""

    value: Any


def _resolve(arg):
    return arg.value if isinstance(arg, LocalRef) else arg


class _LocalMethod:
    def __init__(self, function, num_returns: int = 1):
        self.function, self.num_returns = function, num_returns

    def options(self, num_returns: int = 1) -> _LocalMethod:
        return _LocalMethod(self.function, num_returns)

    def remote(self, *args):
        result = self.function(*(_resolve(a) for a in args))
        if self.num_returns == 1:
            return LocalRef(result)
        return tuple(LocalRef(part) for part in result)


class LocalHandle:
    """An in-process stand-in for a Ray actor handle around a plain object."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.target, name))


class LocalCluster:
    """`get` and `put` for in-process roles."""

    name = "in-process"

    @staticmethod
    def get(refs):
        if isinstance(refs, list):
            return [ref.value for ref in refs]
        return refs.value

    @staticmethod
    def put(value) -> LocalRef:
        return LocalRef(value)

    @staticmethod
    def drain_faults() -> list[dict]:
        """In-process roles cannot die apart from the process: no faults to report."""
        return []

    def record(self, *args, **kwargs) -> None:
        """In-process runs have no Ray metrics to record (TensorBoard has everything)."""

    def shutdown(self) -> None:
        """Nothing to stop."""
