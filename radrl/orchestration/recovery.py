"""Ray roles that survive a dead actor: every call is kept until its result is in, so lost work can be run again.

A role handle here looks like a Ray actor handle (`handle.method.remote(*args)`, `.options(num_returns=2)`), but
each call is recorded in a ledger and returns `TrackedRef`s. When `RayCluster.get` meets a dead actor
(`RayActorError`: a crash, an OOM kill, a lost node, `ray.kill`):

- a rollout worker or reward actor is replaced by a new actor with the same class, arguments and resources; the
  calls that set its state (`STATE_METHODS`: the weights it was sampling with) are replayed up to where the lost
  work began, then the lost calls are run again, in their original order and with their original arguments (so the
  same seeds: the iteration gets the same images). Calls of other roles that consumed a lost result run again too.
- the learner's state (weights, optimizer, RNG) dies with it, so it is replaced and `RoleLost` tells the driver,
  which restores the last checkpoint and rolls back to it (driver.py).

Every fault is kept in `faults` (the driver logs, counts and writes them); past `orchestration.max_failures`
`TooManyFailures` ends the run.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("radrl")

# Methods whose calls set a role's state: replayed into a replacement before the lost work (last of each kind).
STATE_METHODS = ("load_supervised", "load_weights")


class RoleLost(RuntimeError):
    """A stateful role (the learner) died; it has been replaced with a fresh one, its state is gone."""

    def __init__(self, role: str, error: BaseException):
        super().__init__(f"the {role} actor died ({type(error).__name__}); it was restarted empty")
        self.role = role


class TooManyFailures(RuntimeError):
    """More actors died than orchestration.max_failures allows."""


class StartTimeout(RuntimeError):
    """An actor did not start within orchestration.start_timeout_s."""


@dataclass(eq=False)  # compared by identity: its arguments may be arrays
class RoleCall:
    """One submitted method call: enough to submit it again."""

    role: RayRole
    method: str
    args: tuple
    num_returns: int
    sequence: int  # submission order across all roles
    outputs: list[TrackedRef] = field(default_factory=list)
    raw: list = field(default_factory=list)  # the current ray.ObjectRefs, one per return


class TrackedRef:
    """An object ref that follows its call when the call is run again on a replacement actor."""

    __slots__ = ("call", "index")

    def __init__(self, call: RoleCall, index: int):
        self.call, self.index = call, index

    @property
    def raw(self):
        return self.call.raw[self.index]


def _unwrap(value):
    return value.raw if isinstance(value, TrackedRef) else value


class _RoleMethod:
    def __init__(self, role: RayRole, name: str, num_returns: int = 1):
        self.role, self.name, self.num_returns = role, name, num_returns

    def options(self, num_returns: int = 1) -> _RoleMethod:
        return _RoleMethod(self.role, self.name, num_returns)

    def remote(self, *args):
        call = self.role.cluster.submit(self.role, self.name, args, self.num_returns)
        return call.outputs[0] if self.num_returns == 1 else tuple(call.outputs)


class RayRole:
    """A named role (e.g. 'rollout-1') backed by one Ray actor at a time."""

    def __init__(self, cluster, key: str, actor_class, args: tuple, options: dict, stateful: bool = False):
        self.cluster, self.key, self.args, self.options, self.stateful = cluster, key, args, options, stateful
        self.remote_class = cluster.ray.remote(actor_class)
        self.generation = 0  # replacements so far
        self.past_ids: list[str] = []  # ids of the actors it replaced
        self.actor = self._new_actor()
        self.state_calls: dict[str, RoleCall] = {}  # last call of each STATE_METHODS entry
        self.pending: list[RoleCall] = []  # calls whose results the driver has not confirmed

    def _new_actor(self):
        name = self.options["name"] + (f"-r{self.generation}" if self.generation else "")
        return self.remote_class.options(**{**self.options, "name": name}).remote(*self.args)

    @property
    def actor_id(self) -> str:
        return self.actor._actor_id.hex()

    def __getattr__(self, name: str) -> _RoleMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _RoleMethod(self, name)

    def replace(self) -> None:
        """Kill what is left of the current actor and start a new one with the same class, arguments and resources."""
        self.cluster.ray.kill(self.actor, no_restart=True)
        self.past_ids.append(self.actor_id)
        self.generation += 1
        self.actor = self._new_actor()


class CallLedger:
    """Submits role calls, gets their results, and replaces dead actors (see the module docstring)."""

    def __init__(self, ray, max_failures: int, start_timeout_s: float):
        self.ray, self.max_failures, self.start_timeout_s = ray, max_failures, start_timeout_s
        self.roles: dict[str, RayRole] = {}
        self.faults: list[dict] = []  # every recovery, oldest first (the driver drains `new_faults`)
        self.new_faults: list[dict] = []
        self._sequence = itertools.count()

    def role(self, key: str, actor_class, args: tuple, options: dict, stateful: bool = False) -> RayRole:
        role = RayRole(self, key, actor_class, args, options, stateful)
        self.roles[key] = role
        return role

    def submit(self, role: RayRole, method: str, args: tuple, num_returns: int) -> RoleCall:
        call = RoleCall(role, method, args, num_returns, next(self._sequence))
        call.outputs = [TrackedRef(call, i) for i in range(num_returns)]
        self._send(call)
        role.pending.append(call)
        if method in STATE_METHODS:
            role.state_calls[method] = call
        return call

    def _send(self, call: RoleCall) -> None:
        refs = getattr(call.role.actor, call.method).options(num_returns=call.num_returns).remote(
            *(_unwrap(a) for a in call.args))
        call.raw = [refs] if call.num_returns == 1 else list(refs)

    # ------------------------------------------------------------------ results

    def get(self, refs):
        """ray.get for TrackedRefs (and plain refs): results in order, lost work run again where an actor died."""
        single = not isinstance(refs, (list, tuple))
        items = [refs] if single else list(refs)
        recorded = len(self.faults)
        while True:
            try:
                values = self.ray.get([_unwrap(r) for r in items])
                break
            except self.ray.exceptions.RayActorError as error:
                self._recover(error, items)
        for fault in self.faults[recorded:]:  # recovered: from noticing the death to having the lost results
            fault["recovery_s"] = round(time.perf_counter() - fault.pop("noticed"), 3)
        for item in items:
            if isinstance(item, TrackedRef):
                self._confirm(item.call)
        return values[0] if single else values

    def _confirm(self, call: RoleCall) -> None:
        """A call's results are in: it is never run again, nor are the calls whose results it consumed."""
        if call in call.role.pending:
            call.role.pending.remove(call)
        for arg in call.args:
            if isinstance(arg, TrackedRef) and arg.call in arg.call.role.pending:
                self._confirm(arg.call)

    def _recover(self, error, items) -> None:
        start, dead = time.perf_counter(), self._role_of(error)
        if dead is None:
            raise error  # an actor this ledger did not start (not ours to replace)
        replaced, resubmitted = getattr(error, "actor_id", None) == dead.actor_id, 0  # else: replaced already
        if replaced:
            self._count(dead, error)
            dead.replace()
            self.wait_ready([dead])
            if dead.stateful:
                dead.pending.clear()
                dead.state_calls.clear()
                self._record(dead, error, start, resubmitted=0)
                raise RoleLost(dead.key, error) from error
            resubmitted = self._replay(dead)
        for item in items:  # calls of other roles that consumed a lost result failed with the same error: rerun
            if isinstance(item, TrackedRef) and item.call.role is not dead and self._failed(item.call):
                self._send(item.call)
                resubmitted += 1
        if replaced:
            self._record(dead, error, start, resubmitted)

    def _replay(self, role: RayRole) -> int:
        """Run a replacement's lost calls again (after the state they started from); returns how many."""
        lost = [call for call in role.pending if self._failed(call)]
        if not lost:
            return 0
        first = lost[0].sequence
        state = sorted((c for c in role.state_calls.values() if c.sequence < first and c not in lost),
                       key=lambda c: c.sequence)
        for call in state:  # the weights the lost work was sampling with (already confirmed: no new outputs kept)
            getattr(role.actor, call.method).remote(*(_unwrap(a) for a in call.args))
        for call in lost:
            self._send(call)
        return len(lost)

    def _failed(self, call: RoleCall) -> bool:
        """Whether a call's first result is an actor error (its actor is dead, so it settles at once)."""
        try:
            self.ray.get(call.raw[0])
            return False
        except self.ray.exceptions.RayActorError:
            return True

    def _role_of(self, error) -> RayRole | None:
        """The role whose current or an earlier actor the error names."""
        actor_id = getattr(error, "actor_id", None)
        return next((role for role in self.roles.values() if actor_id in (role.actor_id, *role.past_ids)), None)

    def _count(self, role: RayRole, error) -> None:
        if len(self.faults) >= self.max_failures:
            raise TooManyFailures(f"actor {role.key} died ({type(error).__name__}) after {len(self.faults)} earlier "
                                  f"failure(s); orchestration.max_failures = {self.max_failures}") from error

    def _record(self, role: RayRole, error, start: float, resubmitted: int) -> None:
        fault = {"role": role.key, "kind": role.key.split("-")[0], "error": type(error).__name__,
                 "replacement": role.generation, "calls_resubmitted": resubmitted,
                 "restart_s": round(time.perf_counter() - start, 3), "noticed": start, "time": time.time()}
        self.faults.append(fault)
        self.new_faults.append(fault)
        log.warning("actor %s died (%s): replaced in %.1f s, %d lost call(s) resubmitted", role.key,
                    fault["error"], fault["restart_s"], resubmitted)

    # ------------------------------------------------------------------ start

    def wait_ready(self, roles: list[RayRole], needs: str = "") -> None:
        """Wait until every role's actor has started (constructor done), at most orchestration.start_timeout_s."""
        refs = {role.actor.__ray_ready__.remote(): role for role in roles}
        ready, waiting = self.ray.wait(list(refs), num_returns=len(refs), timeout=self.start_timeout_s)
        self.ray.get(ready)  # a constructor that raised raises here
        if waiting:
            late = ", ".join(refs[ref].key for ref in waiting)
            raise StartTimeout(f"actor(s) {late} did not start within {self.start_timeout_s:g} s "
                               f"(orchestration.start_timeout_s). {needs}".strip())

