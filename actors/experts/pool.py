"""An engine's expert actors and the placement groups that hold them. Their owner,
actors/experts/fleet.py (ExpertFleet), drives this class for RayEngine (its frontend an actor)
and for the engine replica (actors/serving/engine_server.py: the frontend in its own process).

    pool = ExpertPool.start(source, dtype, device, expert_replicas=1, experts_per_actor=1,
                            expert_resources=None, frontend_resources=None,
                            max_num_batched_tokens=2048)
    Frontend(source, pool.experts, ...)    # the handles, expert ids and channel secret
    pool.ready()                           # waits until every expert actor has its weights
    pool.frontend_options()                # RayEngine only: its frontend actor's group
    new = pool.grow({(0,): 1}); ...                                    # scaling:
    pool.commit(new, removed, pool.next_generation()); pool.stop(removed)
    pool.shutdown()                        # kills the expert actors, releases their groups

Start-up: plan (cluster/plan.py) from the nodes' free resources, reserve a placement group per
actor pinned to the plan's node (cluster/placement.py; all or nothing), start one expert actor
per (group of `experts_per_actor` expert ids, replica) in its group and make the channel secret;
the actors load their weights while the caller builds its frontend, and `ready()` waits for
them. A group of its own for every actor lets live scaling (actors/experts/scaling.py) add and
remove one actor's resources at a time. The frontend gets a group only when `frontend_resources` is
given (RayEngine); the engine replica passes None: Serve placed it already, with its
`ray_actor_options`, so nothing is reserved twice.
Expert actors are restarted by Ray when they die (the dispatcher re-sends their calls). The
actors and the group belong to the process that started them and go when it dies (Ray's
ownership), so a killed engine replica leaks neither. A shared pool's (`prefix`: its owner is
actors/experts/shared.py's PoolOwner) are detached and named instead, so they outlive their
owner, whose restart finds them again (actors/experts/detached.py); its `shutdown` removes
them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

import ray
from ray.exceptions import ActorDiedError, RayActorError
from ray.util.placement_group import PlacementGroup

from actors.experts.worker import ACTOR_OPTIONS, ENGINE_MAX_TOKENS, ExpertWorker
from actors.failover import unwrap
from cluster.placement import actor_options, cluster_nodes, release, reserve
from cluster.plan import Slot, plan, plan_added
from model.checkpoint import WeightSource

log = logging.getLogger(__name__)
T = TypeVar("T")

CPU_ACTOR = {"CPU": 0.01}   # a small CPU share: label/PG scheduling misplaces 0-CPU actors

# On CPU the frontend and its expert actors share cores, taking turns within every layer. GNU
# OpenMP (PyTorch's on Linux) lets an idle worker thread spin GOMP_SPINCOUNT times (default
# 300,000) before it sleeps, so the frontend's spinning threads took the cores its experts
# computed on: a decode step at batch 64 (`small`, 2 cores, 2 actors x 4 experts) took 156 ms,
# and 121-127 ms with 3,000-30,000 spins. Fewer spins than that slow the frontend's own ops:
# 0 spins (OMP_WAIT_POLICY=PASSIVE) made the in-process engine 29% slower. libgomp reads it at
# process start, so it goes into the frontend process's runtime_env; a value set by the user
# wins. https://gcc.gnu.org/onlinedocs/libgomp/GOMP_005fSPINCOUNT.html
FRONTEND_CPU_ENV = {"GOMP_SPINCOUNT": "30000"}


def frontend_runtime_env(device: str) -> dict:
    """The frontend process's `runtime_env` option: on CPU, FRONTEND_CPU_ENV's variables that
    this process's environment does not set; nothing on CUDA."""
    if device != "cpu":
        return {}
    env = {k: v for k, v in FRONTEND_CPU_ENV.items() if k not in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


def default_resources(device: str) -> dict[str, float]:
    """What one actor (frontend or expert) asks for unless told: a GPU and a CPU on "cuda",
    a small CPU share on "cpu"."""
    return {"GPU": 1, "CPU": 1} if device == "cuda" else dict(CPU_ACTOR)


@dataclasses.dataclass(frozen=True)
class Experts:
    """What a frontend needs to reach its expert actors (picklable: it crosses Ray calls)."""
    actors: list                        # ExpertWorker handles
    actor_experts: list[list[int]]      # the expert ids each actor holds, in its order
    secret: str                         # the channel secret (actors/experts/channel.py)
    nodes: list[str]                    # the node each actor is pinned to (its placement group)
    generation: int = 0                 # +1 a live scaling change: a frontend never goes back
    pool: str = ""                      # a shared pool's name (its frontends check it), or ""

    @classmethod
    def of(cls, members: list[Member], secret: str, generation: int, pool: str = "") -> Experts:
        return cls([m.actor for m in members], [list(m.expert_ids) for m in members], secret,
                   [m.slot.node_id for m in members], generation, pool)


@dataclasses.dataclass(frozen=True)
class Member:
    """One expert actor of the pool: its handle, expert ids, slot and placement group."""
    actor: object
    expert_ids: tuple[int, ...]
    slot: Slot
    pg: PlacementGroup
    name: str = ""          # a shared pool's actor and group name (detached); "" unnamed


RESTART_TIMEOUT_S = 180.0   # from a call's first failure: a restart (start, load) on loaded cores
RESTART_DEATHS = 3          # ActorDiedErrors (a death Ray does not restart from) outlived
RESTART_POLL_S = 0.5


def through_restarts(call: Callable[[], T], what: str) -> T:
    """`call()`, called again while it fails because an expert actor it uses died and Ray
    restarts it (live-added actors have max_restarts=-1), until RESTART_TIMEOUT_S after its
    first failure. In Ray 2.60 a call in flight when such an actor dies, and every call made
    while it restarts (each failing after about 1 s), raise ActorUnavailableError; an
    ActorDiedError means an actor that will not come back (killed without restart; preempted),
    so only RESTART_DEATHS of them are outlived. A failed constructor, any other error, or the
    deadline passed is raised. Errors may arrive wrapped in RayTaskErrors (through the frontend
    actor): `actors.failover.unwrap` finds them. `what` names the call in the log."""
    deaths, deadline = 0, None
    while True:
        try:
            return call()
        except Exception as e:  # only an actor's death or restart is retried (below)
            cause = unwrap(e)
            if not isinstance(cause, RayActorError) or cause.actor_init_failed:
                raise
            deaths += isinstance(cause, ActorDiedError)
            if deadline is None:
                deadline = time.monotonic() + RESTART_TIMEOUT_S
                log.warning("an expert actor died while %s (%s); waiting for its restart",
                            what, type(cause).__name__)
            if deaths > RESTART_DEATHS or time.monotonic() > deadline:
                raise
            time.sleep(RESTART_POLL_S)


def _warm(members: list[Member]) -> None:
    """ExpertWorker.warm on each of these actors, through their restarts (through_restarts);
    a retry warms only those not warm yet."""
    cold = list(members)

    def warm_cold():
        if not cold:
            return
        refs = [m.actor.warm.remote() for m in cold]
        failed = []
        for m, ref in zip(list(cold), refs):
            try:
                ray.get(ref)
                cold.remove(m)
            except Exception as e:  # noqa: BLE001 - raised below, after the others are read
                failed.append(e)
        if failed:      # an error not retried first (through_restarts retries the others)
            raise min(failed, key=lambda e: isinstance(unwrap(e), RayActorError))
    through_restarts(warm_cold, "warming up")


class ExpertPool:
    def __init__(self, source: WeightSource, dtype: str, device: str, members: list[Member],
                 frontend: tuple[Slot, PlacementGroup] | None, expert_resources: dict,
                 expert_threads: int | None, placement_timeout_s: float,
                 max_num_batched_tokens: int = ENGINE_MAX_TOKENS, prefix: str | None = None,
                 secret: str | None = None):
        """`prefix`: a shared pool's name: its actors and groups are detached and named
        `{prefix}/expert/{ids}/{uid}` (actors/experts/shared.py adopts them by it); None: they
        are this process's. `secret`: the channel secret (None: a new one)."""
        self.source, self.dtype, self.device = source, dtype, device
        self.max_num_batched_tokens = max_num_batched_tokens    # bounds a channel call's rows
        self.members, self._frontend = members, frontend
        self.expert_resources, self.expert_threads = expert_resources, expert_threads
        self.placement_timeout_s = placement_timeout_s
        self.prefix = prefix
        self.secret = secret or secrets.token_hex(32)
        self.generation = 0     # of `members`: Experts.generation
        self.closed = False

    @classmethod
    def start(cls, source: WeightSource, dtype: str = "auto", device: str = "cpu", *,
              expert_replicas: int = 1, experts_per_actor: int = 1,
              expert_resources: dict | None = None, frontend_resources: dict | None = None,
              expert_threads: int | None = None, placement_timeout_s: float = 60.0,
              max_num_batched_tokens: int = ENGINE_MAX_TOKENS, prefix: str | None = None,
              secret: str | None = None) -> ExpertPool:
        """Plan, reserve and start the expert actors (without waiting for them: `ready()`).
        PlacementError when the cluster cannot hold the plan (nothing left reserved).
        `expert_resources` per actor (default `default_resources(device)`);
        `frontend_resources`: a bundle for a frontend actor, or None for none.
        `expert_threads`: torch threads per expert actor (None: the process default, which Ray
        sets from the actor's CPUs: 1 for a fractional share). `max_num_batched_tokens`: the
        frontend engine's tokens per step, which bound every channel call's rows
        (actors/experts/channel_server.py: CallBound). `prefix`, `secret`: see __init__."""
        expert_resources = expert_resources or default_resources(device)
        p = plan(cluster_nodes(), source.model_config().num_local_experts, expert_replicas,
                 expert_resources, frontend_resources, experts_per_actor)
        for why in p.shared:
            log.warning("%s", why)
        if prefix is not None and frontend_resources is not None:
            raise ValueError("a shared pool (prefix) reserves no frontend bundle")
        pool = cls(source, dtype, device, [], None, dict(expert_resources), expert_threads,
                   placement_timeout_s, max_num_batched_tokens, prefix, secret)
        actors = p.actors()
        names = [pool._name(ids) for ids, _ in actors]
        pgs = reserve(p.slots(), placement_timeout_s, names if prefix else None)
        pool._frontend = (p.frontend, pgs.pop(0)) if p.frontend is not None else None
        pool.members = [pool._start(ids, slot, pg, name)
                        for (ids, slot), pg, name in zip(actors, pgs, names)]
        log.info("expert pool: %d actors of %d expert(s), %d replica(s) each, starting",
                 len(pool.members), experts_per_actor, expert_replicas)
        return pool

    def _name(self, ids: tuple[int, ...]) -> str:
        """A new actor's name in a shared pool ("" in a pool of this process's)."""
        if self.prefix is None:
            return ""
        return f"{self.prefix}/expert/{'-'.join(map(str, ids))}/{secrets.token_hex(4)}"

    def _start(self, ids: tuple[int, ...], slot: Slot, pg: PlacementGroup,
               name: str = "") -> Member:
        # threads: calls (info, compute) use 4, clients' liveness watches a group of their own
        remote = ray.remote(**ACTOR_OPTIONS)(ExpertWorker)
        named = {"name": name, "lifetime": "detached"} if name else {}
        actor = remote.options(**actor_options(pg, slot), **named).remote(
            self.source, list(ids), self.dtype, self.device, self.expert_threads,
            self.max_num_batched_tokens)
        return Member(actor, tuple(ids), slot, pg, name)

    @property
    def experts(self) -> Experts:
        return Experts.of(self.members, self.secret, self.generation, self.prefix or "")

    def groups(self) -> dict[tuple[int, ...], list[Member]]:
        """Expert ids of one actor -> its replicas, oldest first."""
        out: dict[tuple[int, ...], list[Member]] = {}
        for m in self.members:
            out.setdefault(m.expert_ids, []).append(m)
        return out

    def ready(self) -> None:
        """Wait until every expert actor has loaded its weights; raise an actor's start-up
        error (the caller then shuts the pool down)."""
        ray.get([m.actor.info.remote() for m in self.members])

    def frontend_options(self) -> dict:
        """`.options(...)` that put a frontend actor into the placement group reserved for it,
        with `frontend_runtime_env`; ValueError if the pool was started without
        `frontend_resources` (or is shut down)."""
        if self._frontend is None or self.closed:
            raise ValueError("this pool reserved no frontend bundle (frontend_resources=None)")
        slot, pg = self._frontend
        return {**actor_options(pg, slot), **frontend_runtime_env(self.device)}

    # ---- live scaling (actors/experts/scaling.py) -----------------------------------------
    def grow(self, added: dict[tuple[int, ...], int]) -> list[Member]:
        """Start `added[ids]` more replicas of each group: plan nodes with room (cluster/plan.py:
        plan_added), reserve a placement group per actor, start them, wait until each has
        loaded its tensors and warmed up (ExpertWorker.warm). They are not members yet: the
        caller hands them to the frontend, then `commit`s. PlacementError (nothing reserved)
        when the cluster has no room; on any other failure the new actors are stopped."""
        holders = {ids: [m.slot.node_id for m in ms] for ids, ms in self.groups().items()}
        planned = plan_added(cluster_nodes(), holders, added, self.expert_resources)
        flat = [(ids, slot) for ids, slots in planned.items() for slot in slots]
        names = [self._name(ids) for ids, _ in flat]
        pgs = reserve([slot for _, slot in flat], self.placement_timeout_s,
                      names if self.prefix else None)
        new: list[Member] = []
        try:
            for (ids, slot), pg, name in zip(flat, pgs, names):
                new.append(self._start(ids, slot, pg, name))
            _warm(new)
        except BaseException:
            try:
                self.stop(new)
            finally:
                release(pgs[len(new):])     # reserved, but their actors never started
            raise
        return new

    def next_generation(self) -> int:
        """The generation of the next change: above this one and above the clock in
        microseconds, so that a restarted owner's (which adopted the actors, not the count)
        is newer than any set its predecessor published."""
        return max(self.generation + 1, time.time_ns() // 1000)

    def commit(self, added: list[Member], removed: list[Member], generation: int) -> None:
        """The frontends now use `added` and no longer `removed`, as set `generation`."""
        self.members = [m for m in self.members if m not in removed] + added
        self.generation = generation

    def stop(self, members: list[Member]) -> None:
        """Kill these actors (no restart) and give their resources back."""
        for m in members:
            ray.kill(m.actor, no_restart=True)
        release([m.pg for m in members])

    def shutdown(self) -> None:
        """Kill the expert actors (no restart) and release every placement group; idempotent."""
        if self.closed:
            return
        self.closed = True
        members, self.members = self.members, []
        self.stop(members)
        if self._frontend is not None:
            release([self._frontend[1]])
