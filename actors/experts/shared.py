"""One expert pool shared by several frontends (attention-expert disaggregation, as in
MegaScale-Infer, arXiv:2504.02263, and Janus, arXiv:2512.13525: experts as a service of their
own that several attention instances call).

    pool = SharedExpertPool.start(path, dtype="float32")    # the owner and its expert actors
    a = RayEngine.from_pretrained(path, pool=pool)         # two frontends, one set of experts
    b = RayEngine.from_pretrained(path, pool=pool)
    pool.set_expert_replicas({0: 2}); pool.expert_load(); pool.info()
    a.shutdown(); b.shutdown(); pool.shutdown()

Served, the owner is the application's ExpertPoolServer deployment (actors/serving/pool_server.py)
and every engine replica is a frontend (`expert_pool: shared`, actors/options.py).

The owner (PoolOwner) starts, places, restarts, scales and stops the expert actors through an
ExpertFleet (actors/experts/fleet.py), exactly as a frontend's own pool does, with two
differences. Its actors and their placement groups are detached and named after the pool, so
they outlive the owner's process; an owner that Ray or Serve restarts finds and adopts them
(detached.py) instead of loading new ones, and takes the channel secret from Ray's GCS
key-value store, where the first owner left it. And its `apply` publishes a new set of actors
to every frontend instead of calling one: each frontend's PoolFollower (follower.py) long-polls
`sync` (every SYNC_WAIT_S at least, carrying the generation it uses and its routing load),
switches to a newer set between two of its steps (Frontend.set_experts_now) and acknowledges by
its next `sync`. A change waits until every live frontend (one heard from within LIVE_S) acked,
at most ACK_TIMEOUT_S, before it stops removed actors; a later frontend's calls to a stopped
actor fail over to its replicas (actors/experts/dispatcher.py). Routing load is the sum of the
live frontends' latest loads (ExpertLoad.merged), which the autoscaler reads.
Shutdown: the owner that holds the pool's lease in the key-value store (the last to start or
adopt it) kills the actors and removes their groups; an owner whose pool was adopted by a newer
one (a Serve redeploy) leaves them to it.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path

import ray

from actors.experts.detached import (
    actor_alive,
    adopt_or_start,
    record,
    remove_pool,
    write_record,
)
from actors.experts.follower import SYNC_WAIT_S, PoolClient
from actors.experts.pool import CPU_ACTOR, Experts
from actors.info import ActorLoad, ExpertLoad, MergeStats, PoolInfo
from actors.options import EngineOptions
from model.checkpoint import WeightSource

log = logging.getLogger(f"ray.serve.{__name__}")

LIVE_S = 3 * SYNC_WAIT_S        # a frontend not heard from for this long is gone
ACK_TIMEOUT_S = 60.0            # a change waits this long at most for the frontends to switch
STATS_TIMEOUT_S = 5.0           # merge_stats waits this long at most for the actors' answers


@dataclasses.dataclass
class _Seen:
    generation: int             # the set of actors this frontend uses
    load: ExpertLoad | None     # its latest routing load
    at: float                   # time.monotonic() of its last sync
    pool: str = ""              # the pool it wants ("": any)
    actor: str = ""             # its process's Ray actor id (an engine replica's, a frontend's)


class PoolOwner:
    """The owner of a shared pool; a Ray actor (SharedExpertPool) or a Serve deployment
    (actors/serving/pool_server.py). Its public methods are async: frontends' long polls wait
    on its event loop, blocking work runs in threads."""

    def __init__(self, source: WeightSource, options: EngineOptions, name: str):
        """Adopts the running actors named `name` or starts new ones, and waits until they are
        ready. ValueError / PlacementError as ExpertFleet.start."""
        self.name, self.lease, self.closed = name, uuid.uuid4().hex, False
        kept = record(name)
        secret = kept["secret"] if kept else uuid.uuid4().hex + uuid.uuid4().hex
        # first: an owner that dies from here on leaves a record naming it (detached.py: reap)
        write_record(name, {"secret": secret, "lease": self.lease,
                            "owner": ray.get_runtime_context().get_actor_id()})
        cfg = source.model_config()
        self._shape = (cfg.num_hidden_layers, cfg.num_local_experts)
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self.fleet = adopt_or_start(source, options, name, secret)
        self._published = self.fleet.experts
        self.fleet.attach(self._publish, self.load)
        log.info("expert pool %s: %d actors serve every frontend", name,
                 len(self._published.actors))

    # ---- the frontends' side ----------------------------------------------------------
    async def sync(self, frontend_id: str, generation: int, load: ExpertLoad | None = None,
                   pool: str = "", actor: str = "") -> Experts | None:
        """A frontend's long poll: it uses set `generation` and routed `load`, wants `pool`,
        runs in Ray actor `actor`; -> a newer set of actors as soon as there is one (at once,
        or within SYNC_WAIT_S), else None."""
        changed = self._event()
        with self._lock:
            self._seen[frontend_id] = _Seen(generation, load, time.monotonic(), pool, actor)
            self._forget_gone()
        if self._published.generation <= generation:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), SYNC_WAIT_S)
        experts = self._published
        return experts if experts.generation > generation else None

    async def experts(self) -> Experts:
        """The set of actors every frontend should use now (a new frontend starts with it)."""
        return self._published

    # ---- the operators' side -----------------------------------------------------------
    async def set_expert_replicas(self, replicas: dict[int, int]) -> dict[int, int]:
        """Live scaling of the pool (ExpertFleet.set_expert_replicas): every frontend switches
        before a removed actor stops. -> replicas per expert id; ValueError, PlacementError
        change nothing."""
        return await asyncio.to_thread(self.fleet.set_expert_replicas, replicas)

    async def expert_load(self) -> ExpertLoad:
        """Routing load summed over the live frontends (per expert id, layer and actor)."""
        return self.load()

    async def info(self) -> PoolInfo:
        """The pool once: its actors (expert ids, node, actor id), generation, live frontends,
        their summed load and the actors' merged calls."""
        experts = self._published
        merges = MergeStats.merged((await asyncio.to_thread(self.merge_stats)).values())
        return PoolInfo(self.name, experts.generation, self._live_count(), self.load(),
                        tuple(zip(map(tuple, experts.actor_experts), experts.nodes,
                                  (a._actor_id.hex() for a in experts.actors))), merges)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self, drain_s: float = 0.0) -> None:
        """Stop the autoscaler, kill the actors and remove their groups, if this owner holds
        the pool's lease (else a newer owner adopted them: leave them); idempotent. First, for
        up to `drain_s`, wait until the processes of the frontends that used this pool lately
        are gone (Serve's engine replicas drain their streams while the application is deleted
        or redeployed: their experts must outlast them)."""
        if self.closed:
            return
        self.closed = True
        self._wait_for_frontends(drain_s)
        kept = record(self.name)
        if kept is not None and kept["lease"] != self.lease:
            log.info("expert pool %s: adopted by a newer owner; leaving its actors", self.name)
            if self.fleet.autoscaler is not None:
                self.fleet.autoscaler.stop()
            return
        self.fleet.shutdown()
        remove_pool(self.name)              # what a change cut short may have left, the record
        log.info("expert pool %s: actors stopped", self.name)

    # ---- inside ------------------------------------------------------------------------
    def load(self) -> ExpertLoad:
        now = time.monotonic()
        with self._lock:
            loads = [s.load for s in self._seen.values() if s.load and now - s.at < LIVE_S]
        members = self.fleet.pool.members
        idle = [ActorLoad(m.expert_ids, m.slot.node_id, 0.0, None, m.actor._actor_id.hex())
                for m in members]
        return ExpertLoad.merged(loads, idle, *self._shape)

    def merge_stats(self) -> dict[str, MergeStats]:
        """Actor id (hex) -> that expert actor's MergeStats, cumulative since it started;
        blocking, STATS_TIMEOUT_S at most. An actor that does not answer in time (restarting,
        just removed) is left out."""
        actors = self._published.actors
        refs = [a.merge_stats.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STATS_TIMEOUT_S)
        out = {}
        for actor, ref in zip(actors, refs):
            with contextlib.suppress(ray.exceptions.RayError):
                if ref in ready:
                    out[actor._actor_id.hex()] = ray.get(ref)
        return out

    def _publish(self, experts: Experts) -> None:
        """The fleet's `apply`: every frontend uses `experts` from its next step; returns once
        each live one said so (or ACK_TIMEOUT_S passed: logged)."""
        self._published = experts
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while (late := self._late(experts.generation)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if late:
            log.warning("expert pool %s: frontends %s did not switch to set %d within %g s; "
                        "their calls to removed actors fail over to replicas", self.name,
                        [f[:8] for f in late], experts.generation, ACK_TIMEOUT_S)

    def _wait_for_frontends(self, drain_s: float) -> None:
        now = time.monotonic()
        with self._lock:
            users = {s.actor for s in self._seen.values() if s.actor and now - s.at < LIVE_S
                     and s.pool in ("", self.name)}
        deadline = now + drain_s
        while (users := {a for a in users if actor_alive(a)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        if users:
            log.info("expert pool %s: stopping while %d frontends still run", self.name,
                     len(users))

    def _late(self, generation: int) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [f for f, s in self._seen.items()
                    if now - s.at < LIVE_S and s.generation < generation]

    def _live_count(self) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(now - s.at < LIVE_S for s in self._seen.values())

    def _forget_gone(self) -> None:
        now = time.monotonic()
        for f in [f for f, s in self._seen.items() if now - s.at > 10 * LIVE_S]:
            del self._seen[f]

    def _event(self) -> asyncio.Event:
        """The event the next publish sets (on this owner's event loop)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class SharedExpertPool:
    """A shared pool without Serve: its owner is a detached, named Ray actor (restarted by Ray
    when it dies); `RayEngine.from_pretrained(path, pool=...)` connects frontends to it. The
    pool is shut down at this process's exit if `shutdown` was not called."""

    def __init__(self, owner, name: str, source: WeightSource, options: EngineOptions):
        self.owner, self.name, self.source, self.options = owner, name, source, options
        self.client = PoolClient(owner, name)
        atexit.register(self.shutdown)

    @classmethod
    def start(cls, path: str | Path, *, options: EngineOptions | None = None,
              **fields) -> SharedExpertPool:
        """Start the owner and its expert actors (the expert fields of EngineOptions) and wait
        until they are ready; an error there is raised with nothing left running."""
        o = dataclasses.replace(options, **fields) if options else EngineOptions(**fields)
        source = o.weight_source(WeightSource(path=str(path)))
        source.resolve_dtype(o.dtype, o.device)
        name = f"mixtral-ep-pool:{uuid.uuid4().hex[:8]}"
        remote = ray.remote(max_restarts=-1, max_task_retries=-1)(PoolOwner)
        owner = remote.options(name=name, lifetime="detached", num_cpus=CPU_ACTOR["CPU"],
                               max_concurrency=1000).remote(source, o, name)
        try:
            ray.get(owner.experts.remote())
        except BaseException:               # a failed start, Ctrl-C: nothing may be left
            ray.kill(owner, no_restart=True)
            remove_pool(name)
            raise
        return cls(owner, name, source, o)

    @property
    def experts(self) -> Experts:
        return self.client.call("experts")

    def set_expert_replicas(self, replicas: dict[int, int]) -> dict[int, int]:
        return self.client.call("set_expert_replicas", replicas)

    def expert_load(self) -> ExpertLoad:
        return self.client.call("expert_load")

    def info(self) -> PoolInfo:
        return self.client.call("info")

    def shutdown(self) -> None:
        """Stop the expert actors and the owner; idempotent."""
        atexit.unregister(self.shutdown)
        if not ray.is_initialized():
            return
        try:
            self.client.call("shutdown", timeout_s=120)
        except ray.exceptions.RayError:             # the owner is gone: remove its actors here
            remove_pool(self.name)
        finally:
            ray.kill(self.owner, no_restart=True)
