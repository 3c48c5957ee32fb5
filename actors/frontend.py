"""The frontend: the in-process Engine (scheduler, KV cache, sampler) around the non-expert
weights only, with the Dispatcher over its expert actors as its `moe` function.

One class, used two ways: as RayEngine's async actor (`ray.remote(Frontend)`), and in-process
in the engine replica of the served path (actors/server.py), which then is the frontend.
Either way it must be called from one asyncio event loop: `generate`/`logits` run the engine
in a worker thread, `stream` is an async generator (a Ray streaming call when it is an actor),
and all share one engine, so their requests batch together. It neither starts nor stops its
expert actors: their owner (actors/pool.py) does.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import ray
import torch

from actors.dispatcher import Dispatcher, make_transport
from actors.info import EngineInfo, WorkerInfo
from actors.pool import Experts
from model.checkpoint import WeightSource
from model.engine import Engine, Resume, SamplingParams
from model.linear import nbytes
from model.mixtral import Mixtral, non_expert_names
from model.moe import route
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Frontend:
    def __init__(self, source: WeightSource, experts: Experts, dtype: str = "auto",
                 device: str = "cpu", threads: int | None = None,
                 engine_args: dict | None = None, dispatch_args: dict | None = None,
                 transport: str = "channel"):
        """Loads the non-expert weights (blocking). `threads`: torch threads of this process
        (None: on CPU every core it may use, since the frontend and the experts take turns
        within a layer; Ray would give a fractional-CPU actor one); `transport`: "channel" (with
        `experts.secret`) or "object_refs" (actors/dispatcher.py)."""
        if threads or device == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        cfg = source.model_config()
        tensors = source.load(non_expert_names(cfg), source.resolve_dtype(dtype), device)
        model = Mixtral.from_tensors(cfg, tensors)
        self.dispatcher = Dispatcher(experts.actors, experts.actor_experts, cfg.num_local_experts,
                                     make_transport(transport, experts.secret),
                                     **(dispatch_args or {}))
        self.engine = Engine(model, self.dispatcher.moe, Tokenizer.from_pretrained(source.path),
                             device=device, moe_begin=self.dispatcher.moe_begin,
                             **(engine_args or {}))

    async def generate(self, prompts, params):
        return await asyncio.to_thread(self.engine.generate, prompts, params)

    async def logits(self, prompts):
        return await asyncio.to_thread(self.engine.logits, prompts)

    async def stream(self, prompt, params: SamplingParams, resume: Resume | None = None):
        """StreamChunks; leaving early (or being cancelled) aborts the request, freeing its KV.
        `resume`: continue a request whose engine died (actors/failover.py)."""
        async for chunk in self.engine.stream(prompt, params, resume):
            yield chunk

    async def info(self) -> EngineInfo:
        """The engine's model limits, KV blocks and where each expert actor runs (it asks them)."""
        workers = await asyncio.gather(*[a.info.remote() for a in self.dispatcher.actors])
        experts: dict[int, tuple[str, ...]] = {}
        for ids, worker in zip(self.dispatcher.actor_experts, workers):
            for e in ids:
                experts[e] = experts.get(e, ()) + (worker.node_id,)
        cfg = self.engine.cfg
        return EngineInfo(
            context_length=self.engine.max_model_len, vocab_size=cfg.vocab_size,
            num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts,
            experts_per_token=cfg.num_experts_per_tok,
            frontend_node_id=ray.get_runtime_context().get_node_id(),
            experts=dict(sorted(experts.items())), free_blocks=self.engine.num_free_blocks(),
            total_blocks=self.engine.kv.allocator.num_blocks, retries=self.dispatcher.retries,
            tracked_requests=self.engine.num_tracked())

    def worker_info(self) -> WorkerInfo:
        state = self.engine.model.state_dict()
        return WorkerInfo.of_this_process((), sum(nbytes(t) for t in state.values()),
                                          self.engine.model.checkpoint_names())

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
