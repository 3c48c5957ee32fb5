"""An engine's expert actors and the placement group that holds them: the start-up shared by
RayEngine (its frontend an actor) and the engine replica (actors/server.py: the frontend in
its own process).

    pool = ExpertPool.start(source, dtype, device, expert_replicas=1, experts_per_actor=1,
                            expert_resources=None, frontend_resources=None)
    Frontend(source, pool.experts, ...)    # the handles, expert ids and channel secret
    pool.ready()                           # waits until every expert actor has its weights
    pool.frontend_options()                # RayEngine only: its frontend actor's bundle
    pool.shutdown()                        # kills the expert actors, releases the group

Start-up: plan (cluster/plan.py) from the nodes' free resources, reserve one placement group
pinned to the plan's nodes (cluster/placement.py), start one expert actor per (group of
`experts_per_actor` expert ids, replica) in its bundle and make the channel secret; the actors
load their weights while the caller builds its frontend, and `ready()` waits for them.
Bundle 0 is the frontend's only when `frontend_resources` is given (RayEngine); the engine
replica passes None: Serve placed it already, with its `ray_actor_options`, so nothing is
reserved twice.
Expert actors are restarted by Ray when they die (the dispatcher re-sends their calls). The
actors and the group belong to the process that started them and go when it dies (Ray's
ownership), so a killed engine replica leaks neither.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets

import ray
from ray.util.placement_group import PlacementGroup

from actors.dispatcher import TRANSPORTS
from actors.expert import ExpertWorker
from cluster.placement import actor_options, cluster_nodes, release, reserve
from cluster.plan import Plan, plan
from model.checkpoint import WeightSource, torch_dtype

log = logging.getLogger(__name__)

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


def check_start_args(source: WeightSource | None, dtype: str, transport: str,
                     **threads: int | None) -> None:
    """What would otherwise fail only inside a started actor, checked before anything starts:
    ValueError naming the field. `threads`: each None or a positive int; `source` None skips
    the dtype check against the checkpoint (its name is still checked)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    for name, value in threads.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None (default), got {value!r}")
    if source is not None:
        source.resolve_dtype(dtype)
    elif dtype != "auto":
        torch_dtype(dtype)


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
    secret: str                         # the channel secret (actors/channel.py)


class ExpertPool:
    def __init__(self, experts: Experts, pg: PlacementGroup, plan_: Plan, device: str):
        self.experts, self._pg, self._plan, self._device = experts, pg, plan_, device

    @classmethod
    def start(cls, source: WeightSource, dtype: str = "auto", device: str = "cpu", *,
              expert_replicas: int = 1, experts_per_actor: int = 1,
              expert_resources: dict | None = None, frontend_resources: dict | None = None,
              expert_threads: int | None = None, placement_timeout_s: float = 60.0) -> "ExpertPool":
        """Plan, reserve and start the expert actors (without waiting for them: `ready()`).
        PlacementError when the cluster cannot hold the plan (nothing left reserved).
        `expert_resources` per actor (default `default_resources(device)`);
        `frontend_resources`: a bundle for a frontend actor, or None for none.
        `expert_threads`: torch threads per expert actor (None: the process default, which Ray
        sets from the actor's CPUs: 1 for a fractional share)."""
        p = plan(cluster_nodes(), source.model_config().num_local_experts, expert_replicas,
                 expert_resources or default_resources(device), frontend_resources,
                 experts_per_actor)
        for why in p.shared:
            log.warning("%s", why)
        pg = reserve(p, placement_timeout_s)
        first = 1 if p.frontend is not None else 0
        # threads: its channel's liveness task blocks one, calls (info, compute) use the others
        remote = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=4)(ExpertWorker)
        actors = [remote.options(**actor_options(pg, bundle, slot)).remote(
                      source, list(ids), dtype, device, expert_threads)
                  for bundle, (ids, slot) in enumerate(p.actors(), start=first)]
        experts = Experts(actors, [list(ids) for ids, _ in p.actors()], secrets.token_hex(32))
        log.info("expert pool: %d actors of %d expert(s), %d replica(s) each, starting",
                 len(actors), experts_per_actor, expert_replicas)
        return cls(experts, pg, p, device)

    def ready(self) -> None:
        """Wait until every expert actor has loaded its weights; raise an actor's start-up
        error (the caller then shuts the pool down)."""
        ray.get([a.info.remote() for a in self.experts.actors])

    def frontend_options(self) -> dict:
        """`.options(...)` that put a frontend actor into the bundle reserved for it, with
        `frontend_runtime_env`; ValueError if the pool was started without
        `frontend_resources` (or is shut down)."""
        if self._plan.frontend is None or self._pg is None:
            raise ValueError("this pool reserved no frontend bundle (frontend_resources=None)")
        return {**actor_options(self._pg, 0, self._plan.frontend),
                **frontend_runtime_env(self._device)}

    def shutdown(self) -> None:
        """Kill the expert actors (no restart) and release the placement group; idempotent."""
        if self._pg is None:
            return
        for actor in self.experts.actors:
            ray.kill(actor, no_restart=True)
        pg, self._pg = self._pg, None
        release(pg)
