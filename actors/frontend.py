"""The frontend: the in-process Engine (scheduler, KV cache, sampler) around the non-expert
weights only, with the Dispatcher over its expert actors as its `moe` function.

One class, used two ways: as RayEngine's async actor (`ray.remote(Frontend)`), and in-process
in the engine replica of the served path (actors/serving/engine_server.py), which then is the
frontend. Either way it must be called from one asyncio event loop: `generate`/`logits` run the
engine in a worker thread, `stream` is an async generator (a Ray streaming call when it is an
actor), and all share one engine, so their requests batch together. It neither starts nor stops
its expert actors: their owner (actors/experts/pool.py, actors/experts/scaling.py) does, and
tells it of a new set through `set_experts`, which takes effect between two steps.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import ray
import torch

from actors.experts.dispatcher import Dispatcher
from actors.experts.follower import PoolClient, PoolFollower
from actors.experts.pool import Experts
from actors.experts.transport import make_transport
from actors.info import ActorLoad, EngineInfo, ExpertLoad, WorkerInfo, checkpoint_quantization
from model.checkpoint import WeightSource
from model.engine import Engine, Resume, SamplingParams
from model.mixtral import Mixtral, non_expert_names
from model.moe import route
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Frontend:
    def __init__(self, source: WeightSource, experts: Experts | None, dtype: str = "auto",
                 device: str = "cpu", threads: int | None = None,
                 engine_args: dict | None = None, dispatch_args: dict | None = None,
                 transport: str = "channel", pool: PoolClient | None = None):
        """Loads the non-expert weights (blocking). `threads`: torch threads of this process
        (None: on CPU every core it may use, since the frontend and the experts take turns
        within a layer; Ray would give a fractional-CPU actor one); `transport`: "channel" (with
        `experts.secret`) or "object_refs" (actors/experts/dispatcher.py). `pool`: a shared
        pool's owner (actors/experts/shared.py): `experts` are asked of it (so a restarted
        frontend actor starts with the current ones) and followed by a PoolFollower thread."""
        if threads or device == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        if pool is not None:
            experts = pool.experts()
        cfg = source.model_config()
        tensors = source.load(non_expert_names(cfg), source.resolve_dtype(dtype, device), device)
        model = Mixtral.from_tensors(cfg, tensors)
        self.dispatcher = Dispatcher(experts.actors, experts.actor_experts, cfg.num_local_experts,
                                     make_transport(transport, experts.secret),
                                     **(dispatch_args or {}))
        self._node_of = dict(zip(experts.actors, experts.nodes))    # expert actor -> node id
        self._generation = experts.generation
        self._switching = threading.Lock()      # one set_experts_now at a time
        self.engine = Engine(model, self.dispatcher.moe, Tokenizer.from_pretrained(source.path),
                             device=device, moe_begin=self.dispatcher.moe_begin,
                             **(engine_args or {}))
        self.follower = PoolFollower(pool, self) if pool is not None else None
        self.quantization = checkpoint_quantization(source)     # EngineInfo.quantization

    @property
    def generation(self) -> int:
        """Experts.generation of the expert actors in use."""
        return self._generation

    async def generate(self, prompts, params, experts: Experts | None = None):
        await self.use_experts(experts)
        return await asyncio.to_thread(self.engine.generate, prompts, params)

    async def logits(self, prompts, experts: Experts | None = None):
        await self.use_experts(experts)
        return await asyncio.to_thread(self.engine.logits, prompts)

    async def stream(self, prompt, params: SamplingParams,
                     resume: tuple[Resume, ...] | None = None, experts: Experts | None = None):
        """StreamChunks; leaving early (or being cancelled) aborts the request, freeing its KV.
        `resume`: continue a request whose engine died (actors/failover.py). `experts`
        (RayEngine's calls): the expert actors its owner holds now; a frontend that Ray
        restarted with its constructor's (stale after live scaling) switches first."""
        await self.use_experts(experts)
        async for chunk in self.engine.stream(prompt, params, resume):
            yield chunk

    async def use_experts(self, experts: Experts | None) -> None:
        """`set_experts(experts)` if they are newer than the actors in use (a later
        `Experts.generation`): a call that carries the set from before a change (it started
        while the change was switched in) never switches back."""
        if experts is not None and experts.generation > self._generation:
            await self.set_experts(experts)

    def set_experts_now(self, experts: Experts) -> None:
        """Use these expert actors from the next step on (live scaling, actors/experts/scaling.py):
        channels to new ones are opened first, then the dispatcher switches between two steps;
        a dropped actor gets no row after that, and its calls of earlier steps have all
        returned. Blocks until switched (call it off the event loop); `set_experts` is the
        async form. A set no newer than the one in use (`Experts.generation`) changes nothing:
        concurrent calls of a restarted RayEngine frontend carry the same set."""
        with self._switching:
            if experts.generation <= self._generation:
                return
            transport = self.dispatcher.transport
            new = [a for a in experts.actors if a not in self.dispatcher.actors]
            opened = []
            try:
                for actor in new if hasattr(transport, "connect") else []:
                    opened.append(actor)            # first: a failed connect may leave a part
                    transport.connect(actor)

                def switch():
                    self.dispatcher.set_actors(experts.actors, experts.actor_experts)
                    self._node_of = dict(zip(experts.actors, experts.nodes))
                    self._generation = experts.generation
                self.engine.run_between_steps(switch).result()
            except BaseException:               # not switched: close what was opened for it
                for actor in opened:
                    if actor not in self.dispatcher.actors:
                        transport.disconnect(actor)
                raise

    async def set_experts(self, experts: Experts) -> None:
        await asyncio.to_thread(self.set_experts_now, experts)

    def expert_load(self) -> ExpertLoad:
        """Routing load over the dispatcher's window, per expert id and per expert actor, with
        the node each actor is pinned to (no call to the actors: a restarting one does not
        hold it up)."""
        d = self.dispatcher
        actors, actor_experts, node_of = d.actors, d.actor_experts, self._node_of
        per_layer = d.load.rows_per_s(self.engine.cfg.num_hidden_layers)
        speeds = d.speeds()
        return ExpertLoad(
            window_s=d.load.span_s(),
            rows_per_s=tuple(sum(col) for col in zip(*per_layer)),
            per_layer=tuple(tuple(row) for row in per_layer),
            actors=tuple(ActorLoad(tuple(ids), node_of.get(a, ""), d.load.actor_rows_per_s(a),
                                   speeds.get(a), a._actor_id.hex())
                         for a, ids in zip(actors, actor_experts)))

    async def info(self) -> EngineInfo:
        """The engine's model limits, compute dtype and quantization, KV blocks, where each
        expert actor runs and each expert id's recent load."""
        load = self.expert_load()
        experts: dict[int, tuple[str, ...]] = {}
        for a in load.actors:
            for e in a.expert_ids:
                experts[e] = experts.get(e, ()) + (a.node_id,)
        cfg = self.engine.cfg
        return EngineInfo(
            context_length=self.engine.max_model_len, vocab_size=cfg.vocab_size,
            num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts,
            experts_per_token=cfg.num_experts_per_tok,
            frontend_node_id=ray.get_runtime_context().get_node_id(),
            experts=dict(sorted(experts.items())), free_blocks=self.engine.num_free_blocks(),
            total_blocks=self.engine.kv.allocator.num_blocks, retries=self.dispatcher.retries,
            tracked_requests=self.engine.num_tracked(),
            expert_load=dict(enumerate(load.rows_per_s)),
            dtype=str(self.engine.dtype).removeprefix("torch."), quantization=self.quantization)

    def worker_info(self) -> WorkerInfo:
        return WorkerInfo.of_this_process((), self.engine.model.nbytes(),
                                          self.engine.model.checkpoint_names())

    def dispatch_timings(self, clear: bool = True) -> dict[str, float]:
        """Median seconds per phase of the layer calls since the last clear (Dispatcher.
        timing_summary), then clear them: a benchmark's per-layer round trip under real load."""
        summary = self.dispatcher.timing_summary()
        if clear:
            self.dispatcher.timings.clear()
        return summary

    async def profile_dispatch(self, batch: int, repeats: int, layer: int = 0) -> dict[str, float]:
        return await asyncio.to_thread(self._profile_dispatch, batch, repeats, layer)

    def _profile_dispatch(self, batch: int, repeats: int, layer: int) -> dict[str, float]:
        """Time route + one dispatcher round trip for `batch` random hidden rows of `layer`;
        medians in seconds per phase (routing is the model's, the rest the dispatcher's). Holds
        the engine's step lock: steps and this never share the channel's sockets."""
        with self.engine.step_lock:
            return self._profile_dispatch_locked(batch, repeats, layer)

    def _profile_dispatch_locked(self, batch: int, repeats: int, layer: int) -> dict[str, float]:
        model, cfg = self.engine.model, self.engine.cfg
        gate = model.model.layers[layer].block_sparse_moe.gate.weight
        gen = torch.Generator(device=gate.device).manual_seed(batch)
        self.dispatcher.timings.clear()
        routing = []
        for _ in range(repeats):
            x = torch.randn(batch, cfg.hidden_size, generator=gen, device=gate.device,
                            dtype=gate.dtype)
            start = time.perf_counter()
            weights, experts = route(x, gate, cfg.num_experts_per_tok)
            routing.append(time.perf_counter() - start)
            self.dispatcher.moe(layer, x, weights, experts)
        summary = self.dispatcher.timing_summary()
        self.dispatcher.timings.clear()
        return {"routing": sorted(routing)[len(routing) // 2], **summary}
