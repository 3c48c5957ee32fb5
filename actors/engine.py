"""RayEngine: the expert-parallel engine on a Ray cluster, with the in-process Engine's API.

    import ray; ray.init(address=...)
    from actors import RayEngine
    engine = RayEngine.from_pretrained(path, dtype="float32", expert_replicas=1,
                                       experts_per_actor=1)
    engine.generate([...], SamplingParams(...)); engine.logits([...])
    engine.placement()   # {"frontend": node_id, "experts": {expert_id: (node_id, ...)}}
    engine.info()        # EngineInfo (actors/info.py)
    engine.expert_load() # ExpertLoad: rows per expert id / actor over the load window
    engine.set_expert_replicas({0: 3})   # live scaling (actors/experts/scaling.py)
    engine.shutdown()

Start-up is ExpertPool's (actors/experts/pool.py: plan, a placement group per actor, the expert actors, the
channel secret), with a group reserved for the frontend actor, started there with the pool's
experts. Each actor loads only its own tensors. Every actor is restarted by Ray when it dies, in
its bundle: an expert actor's calls are re-sent by the dispatcher; the frontend's requests (its
KV cache is gone with it) are re-sent once it is back: a stream resumes as prompt + tokens so
far (actors/failover.py) and goes on with no token repeated or missing, a `generate` / `logits`
call runs again (sampled requests are given seeds first, so the outputs are the same), each
within `failover_timeout_s` per failover. Every call carries the current expert actors, so a
frontend that Ray restarted with its constructor's (stale after live scaling) switches to them
before it serves anything. Expert actors are added
and removed live by `set_expert_replicas`, or by the autoscaler (`expert_autoscaling`, a thread
of this process: the one that owns the actors). The served path does not use this class: its
engine replica is the frontend itself (actors/serving/engine_server.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import AsyncIterator

import ray
import torch

from actors.failover import (RETRY_DELAY_S, EngineUnavailable, ResumableStream, engine_died,
                             with_seed)
from actors.frontend import Frontend
from actors.info import EngineInfo, ExpertLoad, WorkerInfo
from actors.experts.pool import ExpertPool, check_start_args, default_resources
from actors.experts.scaling import Autoscaler, ExpertAutoscaling, ExpertScaler
from model.checkpoint import WeightSource
from model.config import resolve_config
from model.engine import Completion, SamplingParams, StreamChunk, as_prompt_list
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


class RayEngine:
    def __init__(self, frontend, pool: ExpertPool, tokenizer: Tokenizer,
                 failover_timeout_s: float = 120.0):
        self.frontend, self._pool, self.tokenizer = frontend, pool, tokenizer
        self.failover_timeout_s = failover_timeout_s
        num_experts = pool.source.model_config().num_local_experts
        self.scaler = ExpertScaler(pool, lambda experts: ray.get(
            self.frontend.set_experts.remote(experts)), num_experts)
        self.autoscaler: Autoscaler | None = None

    @property
    def experts(self) -> list:
        """ExpertWorker handles, in the dispatcher's order."""
        return self._pool.experts.actors

    @property
    def actor_experts(self) -> list[list[int]]:
        """Expert ids of each actor of `experts`."""
        return self._pool.experts.actor_experts

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "auto", **kwargs) -> "RayEngine":
        return cls.from_source(WeightSource(path=str(path)), dtype, **kwargs)

    @classmethod
    def from_config(cls, preset_or_config, dtype: str = "auto", seed: int = 0,
                    **kwargs) -> "RayEngine":
        """Random weights built inside each actor on its device: no files (GPU benchmarks)."""
        source = WeightSource(config=resolve_config(preset_or_config), seed=seed)
        return cls.from_source(source, dtype, **kwargs)

    @classmethod
    def from_source(cls, source: WeightSource, dtype: str = "auto", *,
                    expert_replicas: int = 1, experts_per_actor: int = 1, device: str = "cpu",
                    expert_resources: dict | None = None, frontend_resources: dict | None = None,
                    placement_timeout_s: float = 60.0, frontend_threads: int | None = None,
                    expert_threads: int | None = None,
                    engine_args: dict | None = None, dispatch_args: dict | None = None,
                    transport: str = "channel", failover_timeout_s: float = 120.0,
                    expert_autoscaling: dict | None = None) -> "RayEngine":
        """device "cuda": each actor asks for a GPU by default (pass fractional `GPU`
        resources to share one card); "cpu": a small CPU share. An expert actor holds
        `experts_per_actor` expert ids (must divide num_local_experts, else PlacementError) and
        asks for `expert_resources` as a whole. `transport`: "channel" (a ZeroMQ channel per
        expert actor, authenticated with a secret made here) or "object_refs" (a Ray task per
        actor per layer); see actors/experts/dispatcher.py. `frontend_threads` / `expert_threads`:
        torch threads of the frontend (None: every core on CPU) / of each expert actor (None:
        Ray's default for its CPUs, 1 for a fractional share). `expert_autoscaling`: the
        autoscaling policy's settings (actors/experts/scaling.py: ExpertAutoscaling), None for off."""
        check_start_args(source, dtype, transport, frontend_threads=frontend_threads,
                         expert_threads=expert_threads)
        policy = ExpertAutoscaling.from_args(expert_autoscaling)
        if policy is not None:
            dispatch_args = {"load_window_s": policy.window_s, **(dispatch_args or {})}
        pool = ExpertPool.start(
            source, dtype, device, expert_replicas=expert_replicas,
            experts_per_actor=experts_per_actor, expert_resources=expert_resources,
            frontend_resources=frontend_resources or default_resources(device),
            expert_threads=expert_threads,
            placement_timeout_s=placement_timeout_s)
        frontend = ray.remote(max_restarts=-1, max_task_retries=0)(Frontend).options(
            **pool.frontend_options()).remote(source, pool.experts, dtype, device,
                                              frontend_threads, engine_args, dispatch_args,
                                              transport)
        engine = cls(frontend, pool, Tokenizer.from_pretrained(source.path), failover_timeout_s)
        try:
            pool.ready()
            ray.get(frontend.info.remote())
        except Exception:
            engine.shutdown()
            raise
        if policy is not None:
            engine.autoscaler = Autoscaler(policy, engine.scaler, engine.expert_load)
            engine.autoscaler.start()
        log.info("RayEngine ready")
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

    def _current(self):
        """The expert actors now, passed with every frontend call (Frontend.use_experts)."""
        return self._pool.experts

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
            prompt, params, resume, self._current())), self.failover_timeout_s)
        finished = False
        try:
            async for chunk in chunks:
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if not finished:
                chunks.cancel()

    # ---- elastic experts (actors/experts/scaling.py) ------------------------------------------------
    def set_expert_replicas(self, replicas: dict[int, int]) -> dict[int, int]:
        """Scale expert ids to these replica counts, live; -> replicas per expert id.
        ValueError / PlacementError change nothing (ExpertScaler.set_expert_replicas)."""
        return self.scaler.set_expert_replicas(replicas)

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
        """Stop the autoscaler, wait for a scaling change in progress, then kill the frontend
        and the expert actors and release their placement groups."""
        if self.autoscaler is not None:
            self.autoscaler.stop()
        with self.scaler.lock:
            ray.kill(self.frontend, no_restart=True)
            self._pool.shutdown()
