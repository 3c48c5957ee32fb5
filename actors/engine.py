"""RayEngine: the expert-parallel engine on a Ray cluster, with the in-process Engine's API.

    import ray; ray.init(address=...)
    from actors import RayEngine
    engine = RayEngine.from_pretrained(path, dtype="float32", expert_replicas=1,
                                       experts_per_actor=1)   # any EngineOptions field
    engine = RayEngine.from_pretrained(path, options=EngineOptions(...))   # or all of them
    engine.generate([...], SamplingParams(...)); engine.logits([...])
    engine.placement()   # {"frontend": node_id, "experts": {expert_id: (node_id, ...)}}
    engine.info()        # EngineInfo (actors/info.py)
    engine.expert_load() # ExpertLoad: rows per expert id / actor over the load window
    engine.set_expert_replicas({0: 3})   # live scaling (actors/experts/scaling.py)
    engine.shutdown()

The options are actors/options.py's EngineOptions, checked before anything starts. The expert
actors are an ExpertFleet's (actors/experts/fleet.py: plan, a placement group per actor, the
actors, the channel secret, live scaling and the autoscaler), with a group reserved for the
frontend actor, started there with the fleet's experts. Each actor loads only its own tensors.
Every actor is restarted by Ray when it dies, in its bundle: an expert actor's calls are re-sent
by the dispatcher; the frontend's requests (its KV cache is gone with it) are re-sent once it is
back: a stream resumes as prompt + tokens so far (actors/failover.py) and goes on with no token
repeated or missing, a `generate` / `logits` call runs again (sampled requests are given seeds
first, so the outputs are the same), each within `failover_timeout_s` per failover. Every call
carries the current expert actors, so a frontend that Ray restarted with its constructor's
(stale after live scaling) switches to them before it serves anything. Expert actors are added
and removed live by `set_expert_replicas`, or by the autoscaler (`expert_autoscaling`, a thread
of this process: the one whose fleet owns the actors). The served path does not use this class:
its engine replica is the frontend itself (actors/serving/engine_server.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import ray
import torch

from actors.experts.fleet import ExpertFleet
from actors.experts.pool import Experts
from actors.experts.scaling import Autoscaler
from actors.experts.shared import SharedExpertPool
from actors.failover import (
    RETRY_DELAY_S,
    EngineUnavailable,
    ResumableStream,
    engine_died,
    with_seed,
)
from actors.frontend import Frontend
from actors.info import EngineInfo, ExpertLoad, WorkerInfo, checkpoint_quantization
from actors.options import EngineOptions
from model.admission import as_prompt_list
from model.checkpoint import WeightSource
from model.config import resolve_config
from model.engine import Completion, SamplingParams, StreamChunk
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class _ActorStream:
    """A frontend actor's streaming call as a ChunkStream (actors/failover.py)."""

    def __init__(self, generator):
        self._generator = generator

    async def __anext__(self) -> StreamChunk:
        return await (await self._generator.__anext__())

    def cancel(self) -> None:
        ray.cancel(self._generator)


def _frontend_actor(source: WeightSource, o: EngineOptions, fleet: ExpertFleet | None,
                    pool: SharedExpertPool | None = None):
    """The frontend actor, started in the fleet's frontend group (it loads meanwhile), or,
    on a shared pool, where its `frontend_resources` fit."""
    remote = ray.remote(max_restarts=-1, max_task_retries=0)(Frontend)
    where = fleet.frontend_options() if fleet is not None else o.ray_actor_options()
    return remote.options(**where).remote(
        source, fleet.experts if fleet is not None else None, o.dtype, o.device,
        o.frontend_threads, o.engine_args, o.frontend_dispatch_args(), o.transport,
        pool.client if pool is not None else None)


# EngineOptions fields of the expert actors: on a shared pool, the pool's own options decide them
POOL_FIELDS = ("expert_replicas", "experts_per_actor", "expert_resources", "expert_threads",
               "expert_autoscaling")


def _ignored_fields(o: EngineOptions, pool_o: EngineOptions) -> list[str]:
    """The POOL_FIELDS an engine's options `o` set (not the default) to other values than the
    pool's options `pool_o`: those a RayEngine on that pool does not use. [] when none."""
    default = EngineOptions()
    return [f for f in POOL_FIELDS
            if getattr(o, f) != getattr(default, f) and getattr(o, f) != getattr(pool_o, f)]


class RayEngine:
    def __init__(self, frontend, fleet: ExpertFleet | None, tokenizer: Tokenizer,
                 failover_timeout_s: float = 120.0, pool: SharedExpertPool | None = None):
        """Exactly one of `fleet` (its own expert actors) and `pool` (a shared pool's)."""
        self.frontend, self.fleet, self.tokenizer = frontend, fleet, tokenizer
        self.failover_timeout_s, self.pool = failover_timeout_s, pool

    @property
    def _experts(self) -> Experts:
        return (self.fleet or self.pool).experts

    @property
    def experts(self) -> list:
        """ExpertWorker handles, in the dispatcher's order."""
        return self._experts.actors

    @property
    def actor_experts(self) -> list[list[int]]:
        """Expert ids of each actor of `experts`."""
        return self._experts.actor_experts

    @property
    def autoscaler(self) -> Autoscaler | None:
        """The fleet's autoscaler (its `decisions`), None unless `expert_autoscaling` is set
        (and on a shared pool: its owner runs it)."""
        return self.fleet.autoscaler if self.fleet is not None else None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, options: EngineOptions | None = None,
                        pool: SharedExpertPool | None = None, **fields) -> RayEngine:
        """`fields`: EngineOptions fields, replacing those of `options` (default: defaults).
        `pool`: use this shared pool's expert actors (actors/experts/shared.py) instead of
        starting its own; its expert fields are the pool's then."""
        return cls.from_source(WeightSource(path=str(path)), options=options, pool=pool,
                               **fields)

    @classmethod
    def from_config(cls, preset_or_config, *, seed: int = 0,
                    options: EngineOptions | None = None, **fields) -> RayEngine:
        """Random weights built inside each actor on its device: no files (GPU benchmarks)."""
        source = WeightSource(config=resolve_config(preset_or_config), seed=seed)
        return cls.from_source(source, options=options, **fields)

    @classmethod
    def from_source(cls, source: WeightSource, *, options: EngineOptions | None = None,
                    pool: SharedExpertPool | None = None, **fields) -> RayEngine:
        """Start the expert actors and the frontend actor, and wait until both have loaded.
        `options` (actors/options.py), with `fields` replacing some of them: ValueError naming
        a bad one before anything starts; PlacementError when the cluster cannot hold them;
        an actor's start-up error once everything started is stopped again."""
        o = dataclasses.replace(options, **fields) if options else EngineOptions(**fields)
        source = o.weight_source(source)
        tokenizer = Tokenizer.from_pretrained(source.path)
        if pool is not None:
            return cls._on_pool(source, o, pool, tokenizer)
        fleet = ExpertFleet.start(source, o, frontend_bundle=True)
        engine = None
        try:
            engine = cls(_frontend_actor(source, o, fleet), fleet, tokenizer, o.failover_timeout_s)
            fleet.attach(engine._set_experts, engine.expert_load)
            ray.get(engine.frontend.info.remote())
        except BaseException:
            if engine is None:
                fleet.shutdown()
            else:
                engine.shutdown()
            raise
        log.info("RayEngine ready")
        return engine

    @classmethod
    def _on_pool(cls, source: WeightSource, o: EngineOptions, pool: SharedExpertPool,
                 tokenizer: Tokenizer) -> RayEngine:
        """A frontend actor on a shared pool's experts. ValueError when its model (config.json),
        quantization, dtype or tokens per step do not fit the pool's actors (their channels
        would refuse its rows, or serve another model's experts); one WARNING
        naming the expert fields set here that the pool's options override (POOL_FIELDS)."""
        if source.model_config() != pool.source.model_config():
            raise ValueError(f"the model at {source.path} is not the pool's ({pool.source.path}): "
                             f"their config.json differ, and the pool's expert actors hold "
                             f"the experts")
        if source.resolve_dtype(o.dtype, o.device) != pool.source.resolve_dtype(
                pool.options.dtype, pool.options.device):
            raise ValueError(f"dtype {o.dtype!r} differs from the pool's "
                             f"{pool.options.dtype!r}")
        mine, pools = checkpoint_quantization(source), checkpoint_quantization(pool.source)
        if mine != pools:
            raise ValueError(f"quantization {mine or 'none'!r} differs from the pool's "
                             f"{pools or 'none'!r} (an FP8 checkpoint's is 'fp8'): its expert "
                             f"actors hold the experts' weights")
        if o.max_num_batched_tokens > pool.options.max_num_batched_tokens:
            raise ValueError(f"engine_args.max_num_batched_tokens={o.max_num_batched_tokens} is "
                             f"over the pool's {pool.options.max_num_batched_tokens}, which "
                             f"bounds its expert actors' calls")
        ignored = _ignored_fields(o, pool.options)
        if ignored:
            log.warning("expert pool %s decides its expert actors: ignoring this engine's %s "
                        "(the pool's: %s)", pool.name,
                        ", ".join(f"{f}={getattr(o, f)!r}" for f in ignored),
                        ", ".join(f"{f}={getattr(pool.options, f)!r}" for f in ignored))
        engine = cls(_frontend_actor(source, o, None, pool), None, tokenizer,
                     o.failover_timeout_s, pool)
        try:
            ray.get(engine.frontend.info.remote())
        except BaseException:
            engine.shutdown()
            raise
        log.info("RayEngine ready on expert pool %s", pool.name)
        return engine

    # ---- the Engine API, forwarded to the frontend ----------------------------------------
    def generate(self, prompts, params: SamplingParams = SamplingParams()) -> list[Completion]:
        if isinstance(params, (list, tuple)):
            params = [with_seed(p) for p in params]
        elif not params.greedy and params.seed is None:    # one seed per prompt, as in-process
            params = [with_seed(params) for _ in as_prompt_list(prompts)]
        return self._again_if_the_frontend_dies(self.frontend.generate, prompts, params)

    def logits(self, prompts) -> torch.Tensor | list[torch.Tensor]:
        return self._again_if_the_frontend_dies(self.frontend.logits, prompts)

    def _current(self) -> Experts | None:
        """The expert actors now, passed with every frontend call (Frontend.use_experts);
        None on a shared pool, which the frontend follows itself."""
        return self.fleet.experts if self.fleet is not None else None

    def _set_experts(self, experts: Experts) -> None:
        """The fleet's `apply`: the frontend uses exactly these actors from its next step."""
        ray.get(self.frontend.set_experts.remote(experts))

    def _again_if_the_frontend_dies(self, method, *args):
        """method.remote(*args), sent again (up to 3 times) if the frontend dies meanwhile;
        each wait for the restarted frontend is bounded by failover_timeout_s."""
        for failover in range(4):
            try:
                if failover:                   # the restarted frontend answers (or time is up)
                    ray.get(self.frontend.info.remote(), timeout=self.failover_timeout_s)
                return ray.get(method.remote(*args, experts=self._current()))
            except ray.exceptions.GetTimeoutError:
                raise EngineUnavailable(f"the frontend did not come back within "
                                        f"{self.failover_timeout_s:g} s") from None
            except Exception as e:
                if not engine_died(e) or failover == 3:
                    raise
                log.warning("the frontend died (%s); sending the call again", type(e).__name__)
                time.sleep(RETRY_DELAY_S * 2 ** failover)

    async def stream(self, prompt, params: SamplingParams = SamplingParams()
                     ) -> AsyncIterator[StreamChunk]:
        """Leaving early cancels the frontend's stream, which aborts the request there."""
        params = with_seed(params)

        chunks = ResumableStream(lambda resume: _ActorStream(self.frontend.stream.remote(
            prompt, params, resume, self._current())), self.failover_timeout_s,
            choices=params.n)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            if not chunks.finished:          # left early: every unfinished choice is cancelled
                chunks.cancel()

    # ---- elastic experts (actors/experts/scaling.py) -------------------------------------
    def set_expert_replicas(self, replicas: dict[int, int]) -> dict[int, int]:
        """Scale expert ids to these replica counts, live; -> replicas per expert id.
        ValueError / PlacementError change nothing (ExpertScaler.set_expert_replicas). On a
        shared pool: the pool's, for all its frontends."""
        return (self.fleet or self.pool).set_expert_replicas(replicas)

    def expert_load(self) -> ExpertLoad:
        """Rows routed per expert id (per layer and in all) and per actor over the load window."""
        ray.get(self.frontend.use_experts.remote(self._current()))
        return ray.get(self.frontend.expert_load.remote())

    # ---- inspection ---------------------------------------------------------------------
    def info(self) -> EngineInfo:
        ray.get(self.frontend.use_experts.remote(self._current()))
        return ray.get(self.frontend.info.remote())

    def placement(self) -> dict:
        """Where the actors actually run: {"frontend": node, "experts": {id: (nodes...)}}."""
        info = self.info()
        return {"frontend": info.frontend_node_id, "experts": dict(info.experts)}

    def expert_info(self) -> list[WorkerInfo]:
        """One per expert actor, in `self.experts` order."""
        return ray.get([a.info.remote() for a in self.experts])

    def frontend_info(self) -> WorkerInfo:
        return ray.get(self.frontend.worker_info.remote())

    def shutdown(self) -> None:
        """Stop the autoscaler, wait for a scaling change in progress, kill the frontend, then
        the expert actors, and release their placement groups (ExpertFleet.shutdown). On a
        shared pool only the frontend: the pool's `shutdown` stops its actors."""
        kill = lambda: ray.kill(self.frontend, no_restart=True)     # noqa: E731
        if self.fleet is None:
            kill()
        else:
            self.fleet.shutdown(first=kill)
