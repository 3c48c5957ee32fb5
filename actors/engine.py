"""RayEngine: the expert-parallel engine on a Ray cluster, with the in-process Engine's API.

    import ray; ray.init(address=...)
    from actors import RayEngine
    engine = RayEngine.from_pretrained(path, dtype="float32", expert_replicas=1,
                                       experts_per_actor=1)
    engine.generate([...], SamplingParams(...)); engine.logits([...])
    engine.placement()   # {"frontend": node_id, "experts": {expert_id: (node_id, ...)}}
    engine.info()        # EngineInfo (actors/info.py)
    engine.shutdown()

Start-up: plan (cluster/plan.py) from the nodes' free resources, reserve one placement group
pinned to the plan's nodes (cluster/placement.py), start one expert actor per (group of
`experts_per_actor` expert ids, replica) in its bundle, then the frontend with their handles.
Each actor loads only its own tensors. Expert actors are restarted by Ray when they die (their
calls are re-sent by the dispatcher); the frontend is not (its KV cache is gone with it): its
in-flight requests fail with a RayActorError.
"""
from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import AsyncIterator

import ray
import torch

from actors.expert import ExpertWorker
from actors.frontend import Frontend
from actors.info import EngineInfo, WorkerInfo
from cluster.placement import actor_options, cluster_nodes, release, reserve
from cluster.plan import plan
from model.checkpoint import WeightSource
from model.config import resolve_config
from model.engine import Completion, SamplingParams, StreamChunk
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CPU_ACTOR = {"CPU": 0.01}   # a small CPU share: label/PG scheduling misplaces 0-CPU actors


class RayEngine:
    def __init__(self, frontend, experts: list, actor_experts: list[list[int]], pg,
                 tokenizer: Tokenizer):
        self.frontend, self.experts, self.actor_experts = frontend, experts, actor_experts
        self._pg, self.tokenizer = pg, tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", **kwargs) -> "RayEngine":
        return cls.from_source(WeightSource(path=str(path)), dtype, **kwargs)

    @classmethod
    def from_config(cls, preset_or_config, dtype: str = "float32", seed: int = 0,
                    **kwargs) -> "RayEngine":
        """Random weights built inside each actor on its device: no files (GPU benchmarks)."""
        source = WeightSource(config=resolve_config(preset_or_config), seed=seed)
        return cls.from_source(source, dtype, **kwargs)

    @classmethod
    def from_source(cls, source: WeightSource, dtype: str = "float32", *,
                    expert_replicas: int = 1, experts_per_actor: int = 1, device: str = "cpu",
                    expert_resources: dict | None = None, frontend_resources: dict | None = None,
                    placement_timeout_s: float = 60.0, threads: int | None = None,
                    engine_args: dict | None = None, dispatch_args: dict | None = None,
                    transport: str = "channel") -> "RayEngine":
        """device "cuda": each actor asks for a GPU by default (pass fractional `GPU`
        resources to share one card); "cpu": a small CPU share. An expert actor holds
        `experts_per_actor` expert ids (must divide num_local_experts, else PlacementError) and
        asks for `expert_resources` as a whole. `transport`: "channel" (a ZeroMQ channel per
        expert actor, authenticated with a secret made here) or "object_refs" (a Ray task per
        actor per layer); see actors/dispatcher.py."""
        default = {"GPU": 1, "CPU": 1} if device == "cuda" else CPU_ACTOR
        p = plan(cluster_nodes(), source.model_config().num_local_experts, expert_replicas,
                 expert_resources or default, frontend_resources or default, experts_per_actor)
        pg = reserve(p, placement_timeout_s)
        # threads: its channel's liveness task blocks one, calls (info, compute) use the others
        expert_cls = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=4)(ExpertWorker)
        experts = [expert_cls.options(**actor_options(pg, bundle, slot)).remote(
                       source, list(ids), dtype, device, threads)
                   for bundle, (ids, slot) in enumerate(p.actors(), start=1)]
        actor_experts = [list(ids) for ids, _ in p.actors()]
        frontend_cls = ray.remote(max_restarts=0)(Frontend)
        frontend = frontend_cls.options(**actor_options(pg, 0, p.frontend)).remote(
            source, experts, actor_experts, dtype, device, threads, engine_args, dispatch_args,
            transport, secrets.token_hex(32))
        engine = cls(frontend, experts, actor_experts, pg, Tokenizer.from_pretrained(source.path))
        try:
            ray.get([frontend.info.remote()] + [a.info.remote() for a in experts])
        except Exception:
            engine.shutdown()
            raise
        log.info("RayEngine ready: %d expert actors of %d expert(s), %d replica(s) each",
                 len(experts), experts_per_actor, expert_replicas)
        return engine

    # ---- the Engine API, forwarded to the frontend ----------------------------------------
    def generate(self, prompts, params: SamplingParams = SamplingParams()) -> list[Completion]:
        return ray.get(self.frontend.generate.remote(prompts, params))

    def logits(self, prompts) -> torch.Tensor | list[torch.Tensor]:
        return ray.get(self.frontend.logits.remote(prompts))

    async def stream(self, prompt, params: SamplingParams = SamplingParams()
                     ) -> AsyncIterator[StreamChunk]:
        """Leaving early cancels the frontend's stream, which aborts the request there."""
        generator = self.frontend.stream.remote(prompt, params)
        finished = False
        try:
            async for ref in generator:
                chunk = await ref
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if not finished:
                ray.cancel(generator)

    # ---- inspection ---------------------------------------------------------------------
    def info(self) -> EngineInfo:
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
        for actor in [self.frontend, *self.experts]:
            ray.kill(actor, no_restart=True)
        release(self._pg)
