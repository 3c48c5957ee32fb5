"""Elastic experts: replicas of each expert id added and removed live, by hand or by measured load.

    scaler = ExpertScaler(pool, apply=frontend_set_experts)  # actors/experts/pool.py, a frontend's
    scaler.set_expert_replicas({0: 3, 5: 1})                   # -> replicas per expert id now
    autoscaler = Autoscaler(ExpertAutoscaling.from_args({...}), scaler, load=frontend_load)
    autoscaler.start() ... autoscaler.stop()

Adding a replica (ExpertPool.grow): plan a node with room, preferring one that holds no replica
of that expert; reserve a placement group for the actor, pinned to that node; start it; it loads
only its expert's tensors and warms up. Only then `apply` gives the frontend the new set of
actors, which opens the new channels and switches between two steps (Frontend.set_experts):
decoding never waits for a load. Removing one: `apply` first (no row goes to it after the
switch, and the step before it has returned all its calls), then the actor is killed and its
placement group removed. All or nothing: a request for more than the cluster holds raises
PlacementError and changes nothing; a replica that dies while added is restarted by Ray and
waited for (bounded: actors/experts/pool.py through_restarts), else the addition fails and changes
nothing.

With `experts_per_actor` > 1 the unit of scaling is an actor's group of expert ids: every id of
a group must be asked the same count.

The policy (Autoscaler, off unless configured): every `interval_s` it reads the load over the
dispatcher's window (`window_s`, actors/experts/load.py). An expert's wanted replicas are
`ceil(load / target)`, where target is `target_rows_per_s` per replica, or `target_load_ratio`
times the mean expert's load; it scales up to that at once (as far as nodes have room), and down
only once the load fits in fewer replicas at `downscale_headroom` of the target (hysteresis),
within [min_replicas, max_replicas], and not within `cooldown_s` of that expert's last change.
Each decision is logged with the load that caused it. (Ray Serve's replica autoscaling has the
same knobs under other names: look_back_period_s, upscale/downscale_delay_s.)
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

from actors.experts.pool import ExpertPool, Experts, Member, through_restarts
from actors.info import ExpertLoad
from cluster.plan import PlacementError

log = logging.getLogger(f"ray.serve.{__name__}")


class ExpertScaler:
    def __init__(self, pool: ExpertPool, apply: Callable[[Experts], None], num_experts: int):
        """`apply(experts)`: make the frontend use exactly these actors, returning once it
        does (between two steps)."""
        self.pool, self._apply, self.num_experts = pool, apply, num_experts
        self.lock = threading.Lock()            # one change at a time (user, autoscaler, shutdown)

    def groups(self) -> list[tuple[int, ...]]:
        """The expert ids of each actor group: the unit of scaling."""
        return sorted(self.pool.groups())

    def replicas(self) -> dict[int, int]:
        """expert id -> actors holding it now."""
        out = {e: 0 for e in range(self.num_experts)}
        for m in self.pool.members:
            for e in m.expert_ids:
                out[e] += 1
        return out

    def set_expert_replicas(self, targets: Mapping[int, int]) -> dict[int, int]:
        """Scale the named expert ids to these replica counts (others unchanged); returns
        replicas per expert id afterwards. ValueError naming a bad id or count, PlacementError
        when the cluster cannot hold the additions: nothing changed in either case."""
        with self.lock:
            if self.pool.closed:
                raise RuntimeError("the engine is shut down: no expert replicas to set")
            groups = self._by_group(targets)
            current = self.pool.groups()
            added = {ids: n - len(current[ids]) for ids, n in groups.items()
                     if n > len(current[ids])}
            removed = [m for ids, n in groups.items() if n < len(current[ids])
                       for m in _victims(current[ids], len(current[ids]) - n)]
            if not added and not removed:
                return self.replicas()
            start = time.monotonic()
            new = self.pool.grow(added) if added else []
            kept = [m for m in self.pool.members if m not in removed] + new
            switched = Experts.of(kept, self.pool.secret, self.pool.next_generation(),
                                  self.pool.prefix or "")
            try:
                # a new actor that died after warming fails its channel's opening
                through_restarts(lambda: self._apply(switched), "being switched in")
            except BaseException:
                self.pool.stop(new)
                raise
            self.pool.commit(new, removed, switched.generation)
            self.pool.stop(removed)
            log.info("expert replicas now %s (added %s, removed %s) in %.1f s",
                     _fmt(self.replicas()), _fmt_members(new), _fmt_members(removed),
                     time.monotonic() - start)
            return self.replicas()

    def _by_group(self, targets: Mapping[int, int]) -> dict[tuple[int, ...], int]:
        group_of = {e: ids for ids in self.pool.groups() for e in ids}
        out: dict[tuple[int, ...], int] = {}
        for e, n in targets.items():
            if isinstance(e, bool) or not isinstance(e, int) or e not in group_of:
                raise ValueError(f"expert id must be an int in [0, {self.num_experts}), got {e!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"replicas of expert {e} must be an int >= 1, got {n!r}")
            ids = group_of[e]
            if out.setdefault(ids, n) != n:
                raise ValueError(f"experts {list(ids)} share an actor: ask them the same count")
        return out


def _victims(members: list[Member], count: int) -> list[Member]:
    """Which replicas of one group go: those sharing a node with another replica of it first,
    then the newest."""
    nodes = [m.slot.node_id for m in members]
    order = sorted(range(len(members)), key=lambda i: (nodes.count(nodes[i]) == 1, -i))
    return [members[i] for i in order[:count]]


def _fmt(replicas: Mapping[int, int]) -> str:
    return "{" + ", ".join(f"{e}: {n}" for e, n in sorted(replicas.items())) + "}"


def _fmt_members(members: list[Member]) -> str:
    return ", ".join(f"{list(m.expert_ids)} on {m.slot.node_id[:8]}" for m in members) or "none"


# ---- the policy ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExpertAutoscaling:
    """The autoscaling policy's settings (Serve args / RayEngine: `expert_autoscaling`)."""
    min_replicas: int = 1
    max_replicas: int = 4
    target_rows_per_s: float | None = None    # rows per second one replica should carry
    target_load_ratio: float | None = None    # ... or that times the mean expert's load
    window_s: float = 30.0                    # the load is measured over this window
    cooldown_s: float = 30.0                  # between two changes of one expert
    interval_s: float = 5.0                   # between two decisions
    downscale_headroom: float = 0.8           # scale down only below this share of target

    def __post_init__(self):
        def number(name, low, integer=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) \
                    or not low <= v < math.inf:
                kind = "an integer" if integer else "a number"
                raise ValueError(f"expert_autoscaling.{name} must be {kind} >= {low}, got {v!r}")
        number("min_replicas", 1, integer=True)
        number("max_replicas", self.min_replicas, integer=True)
        number("window_s", 1)
        number("cooldown_s", 0)
        number("interval_s", 0.1)
        if (self.target_rows_per_s is None) == (self.target_load_ratio is None):
            raise ValueError("expert_autoscaling needs exactly one of target_rows_per_s and "
                             "target_load_ratio")
        number("target_rows_per_s" if self.target_load_ratio is None else "target_load_ratio",
               1e-9)
        if not 0 < self.downscale_headroom <= 1:
            raise ValueError(f"expert_autoscaling.downscale_headroom must be in (0, 1], got "
                             f"{self.downscale_headroom!r}")

    @classmethod
    def from_args(cls, args: Mapping | None) -> ExpertAutoscaling | None:
        """None for None (autoscaling off); ValueError naming an unknown key."""
        if args is None:
            return None
        if not isinstance(args, Mapping):
            raise ValueError(f"expert_autoscaling must be a mapping, got {args!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown expert_autoscaling keys {unknown}; expected {fields}")
        return cls(**args)

    def wanted(self, load: float, mean_load: float, replicas: int) -> int:
        """Replicas one expert should have for `load` rows/s (mean over experts: `mean_load`)."""
        target = (self.target_rows_per_s if self.target_rows_per_s is not None
                  else self.target_load_ratio * mean_load)
        if target <= 0:
            return self.min_replicas
        up = math.ceil(load / target - 1e-9)
        if up > replicas:                    # never below min_replicas, even when fewer run now
            return max(min(up, self.max_replicas), self.min_replicas)
        down = math.ceil(load / (target * self.downscale_headroom) - 1e-9)
        return max(min(down, replicas, self.max_replicas), self.min_replicas)


class Autoscaler:
    def __init__(self, policy: ExpertAutoscaling, scaler: ExpertScaler,
                 load: Callable[[], ExpertLoad], clock: Callable[[], float] = time.monotonic):
        self.policy, self.scaler, self._load, self._clock = policy, scaler, load, clock
        self._changed: dict[tuple[int, ...], float] = {}    # actor group -> its last change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the latest changes made, for tests and operators: {"at", "replicas", "load"}
        self.decisions: collections.deque[dict] = collections.deque(maxlen=1000)

    def tick(self) -> dict[int, int]:
        """One decision: read the load, scale what should change (each down, then each up as
        far as the cluster has room); -> the new replica counts of the expert ids changed.
        The unit is an actor's group of expert ids (one id with experts_per_actor=1), its
        load that of its busiest id."""
        load, now = self._load(), self._clock()
        replicas = self.scaler.replicas()
        mean = sum(load.rows_per_s) / len(load.rows_per_s)
        changes = {}
        for ids in self.scaler.groups():
            if now - self._changed.get(ids, -math.inf) < self.policy.cooldown_s:
                continue
            rate, n = max(load.rows_per_s[e] for e in ids), replicas[ids[0]]
            wanted = self.policy.wanted(rate, mean, n)
            if wanted != n:
                changes[ids] = (wanted, n, rate)
        done: dict[int, int] = {}
        for ids, (wanted, n, rate) in sorted(changes.items(), key=lambda kv: -kv[1][2]):
            for m in (range(wanted, n, -1) if wanted > n else [wanted]):   # up: as far as room
                try:
                    self.scaler.set_expert_replicas(dict.fromkeys(ids, m))
                except PlacementError as err:
                    log.info("autoscaler: no room for %d replicas of experts %s: %s",
                             m, list(ids), err)
                    continue
                except Exception as err:  # noqa: BLE001 - the others still get their turn
                    log.warning("autoscaler: scaling experts %s to %d failed: %s: %s",
                                list(ids), m, type(err).__name__, err)
                    break
                log.info("autoscaler: experts %s %d -> %d replicas: %.1f rows/s over the last "
                         "%.0f s (mean expert %.1f rows/s)", list(ids), n, m, rate,
                         load.window_s, mean)
                done.update(dict.fromkeys(ids, m))
                self._changed[ids] = now
                self.decisions.append({"at": now, "replicas": dict.fromkeys(ids, m),
                                       "load": [round(r, 1) for r in load.rows_per_s]})
                break
        return done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="expert-autoscaler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Decides every interval_s until stopped. A failed decision is logged and retried next
        interval; anything else that ends the thread is logged as an ERROR with its traceback
        (the engine serves on, its replica counts frozen: not a reason to fail its liveness)."""
        try:
            while not self._stop.wait(self.policy.interval_s):
                try:
                    self.tick()
                except Exception as e:  # noqa: BLE001 - retried next interval
                    log.warning("autoscaler: decision failed: %s: %s", type(e).__name__, e)
        except BaseException:
            log.error("autoscaler: stopped by an unexpected error; expert replicas stay as "
                      "they are", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
