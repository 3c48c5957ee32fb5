"""ExpertFleet: the one owner of an engine's expert actors, from start to stop.

    fleet = ExpertFleet.start(source, options)     # plan, reserve, start the actors; no wait
    frontend = Frontend(source, fleet.experts, ...)            # the caller's, while they load
    fleet.attach(apply=frontend.set_experts_now, load=frontend.expert_load)  # waits for them
    fleet.set_expert_replicas({0: 3})              # live scaling, switched in through `apply`
    fleet.shutdown()                               # the autoscaler, then the actors and groups

Start: ExpertPool.start (actors/experts/pool.py: the plan, a placement group per actor, the
actors, the channel secret); a frontend that is an actor of its own (RayEngine) asks for a group
beside them (`frontend_bundle=True`, then `frontend_options()`). The actors load their weights
while the caller builds its frontend; `attach` waits for them, and from then on the fleet
drives that frontend through two callbacks only: `apply(experts)` (use exactly these actors from
the next step; return once it does) and `load()` (its routing load, actors/info.py: ExpertLoad).
It never builds or holds a frontend, so the pool's owner need not be one: a shared pool's owner
(actors/experts/shared.py) gives an `apply` that publishes to every frontend and waits for
them, and a `load` that sums theirs.
It owns the ExpertScaler (live scaling, actors/experts/scaling.py) and, when
`options.expert_autoscaling` is set, the Autoscaler thread, started once attached.
A failed start leaves nothing: PlacementError reserves nothing, and an actor's start-up error
in `attach` is raised after the fleet is shut down. `shutdown` stops the autoscaler, waits for a
scaling change in progress, then kills the actors and releases their groups; it is idempotent.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from actors.experts.pool import ExpertPool, Experts, default_resources
from actors.experts.scaling import Autoscaler, ExpertAutoscaling, ExpertScaler
from actors.info import ExpertLoad
from model.checkpoint import WeightSource

if TYPE_CHECKING:
    from actors.options import EngineOptions

log = logging.getLogger(f"ray.serve.{__name__}")


class ExpertFleet:
    def __init__(self, pool: ExpertPool, policy: ExpertAutoscaling | None):
        self.pool, self.policy = pool, policy
        self.scaler: ExpertScaler | None = None         # once attached
        self.autoscaler: Autoscaler | None = None       # once attached, with a policy

    @classmethod
    def start(cls, source: WeightSource, options: EngineOptions, *,
              frontend_bundle: bool = False, prefix: str | None = None,
              secret: str | None = None) -> ExpertFleet:
        """Plan, reserve and start the expert actors of `options` (actors/options.py) without
        waiting for them. `frontend_bundle`: also reserve `options.frontend_resources` for a
        frontend actor (`frontend_options()`). `prefix`, `secret`: a shared pool's detached,
        named actors (ExpertPool). ValueError when `options.dtype` does not fit the
        checkpoint, PlacementError when the cluster cannot hold the plan: nothing started."""
        source.resolve_dtype(options.dtype, options.device)
        frontend = options.frontend_resources or default_resources(options.device)
        pool = ExpertPool.start(
            source, options.dtype, options.device, expert_replicas=options.expert_replicas,
            experts_per_actor=options.experts_per_actor,
            expert_resources=options.expert_resources,
            frontend_resources=frontend if frontend_bundle else None,
            expert_threads=options.expert_threads,
            placement_timeout_s=options.placement_timeout_s,
            max_num_batched_tokens=options.max_num_batched_tokens, prefix=prefix, secret=secret)
        return cls(pool, options.autoscaling)

    @property
    def experts(self) -> Experts:
        """The actors now: what a frontend needs to reach them (handles, ids, secret)."""
        return self.pool.experts

    def frontend_options(self) -> dict:
        """`.options(...)` for a frontend actor in the group reserved for it (start's
        `frontend_bundle`); ValueError if none was."""
        return self.pool.frontend_options()

    def attach(self, apply: Callable[[Experts], None], load: Callable[[], ExpertLoad]) -> None:
        """Wait until every actor has loaded its weights, then drive the frontend through
        `apply` and `load` (see the module doc) and start the autoscaler if there is a policy.
        An actor's start-up error is raised once the fleet is shut down."""
        try:
            self.pool.ready()
        except BaseException:
            self.shutdown()
            raise
        num_experts = self.pool.source.model_config().num_local_experts
        self.scaler = ExpertScaler(self.pool, apply, num_experts)
        if self.policy is not None:
            self.autoscaler = Autoscaler(self.policy, self.scaler, load)
            self.autoscaler.start()
        log.debug("expert fleet ready: %d actors", len(self.pool.members))

    def set_expert_replicas(self, replicas: dict[int, int]) -> dict[int, int]:
        """Scale expert ids to these replica counts, live; -> replicas per expert id.
        ValueError / PlacementError change nothing (ExpertScaler.set_expert_replicas);
        RuntimeError before `attach` or after `shutdown`."""
        if self.scaler is None:
            raise RuntimeError("no frontend is attached to these expert actors yet")
        return self.scaler.set_expert_replicas(replicas)

    def shutdown(self, first: Callable[[], None] = lambda: None) -> None:
        """Stop the autoscaler, wait for a scaling change in progress, call `first` (e.g. kill
        a frontend actor that sits in the fleet's frontend group), then kill the actors (no
        restart) and release their placement groups; idempotent."""
        if self.autoscaler is not None:
            self.autoscaler.stop()
        with self.scaler.lock if self.scaler is not None else contextlib.nullcontext():
            first()
            self.pool.shutdown()
