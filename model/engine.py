"""The in-process engine: scheduler -> one model step over a packed batch -> sampler.

It is the reference every distributed path must equal: the Ray frontend (actors/) runs this
same class with its dispatcher as the `moe` function instead of local experts.

    engine = Engine.from_pretrained(path, dtype="float32")
    outs = engine.generate(["a prompt", [1, 733, 16289]], SamplingParams(max_tokens=20, temperature=0))
    logits = engine.logits([1, 733, 16289])                  # (T, V) float32, every position
    async for chunk in engine.stream("a prompt", params): ...

Text prompts are encoded with BOS. Token ids of a completion include the token that stopped it
(EOS or a stop token id); its text does not, and it ends before the first stop string. Streamed
text deltas never split a character and concatenate to the completion's text.
Shapes: N tokens in the step (packed), D hidden, V vocab, B sequences that sample.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import torch

from model.attention import FLASH_BLOCK_SIZE, AttentionMetadata, KVCache, select_backend
from model.checkpoint import WeightSource, torch_dtype
from model.config import MixtralConfig, resolve_config
from model.errors import InvalidRequest, QueueFull
from model.mixtral import Mixtral, MoeFn, tensor_shapes
from model.moe import LocalExperts
from model.sampling import SamplingParams, make_generator, sample
from model.scheduler import Request, Scheduler
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["Engine", "SamplingParams", "Completion", "StreamChunk", "QueueFull"]

Prompt = str | Sequence[int]


@dataclasses.dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str          # "length" | "stop"
    logprobs: list[float]


@dataclasses.dataclass
class StreamChunk:
    request_id: str
    text: str                   # new text since the previous chunk
    token_ids: list[int]        # new token ids
    logprobs: list[float]
    finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class _Tracked:
    """Engine-side state of a request: detokenizer, text, what was streamed, logits."""
    req: Request
    detok: object = None
    text: str = ""
    emitted_text: int = 0
    emitted_tokens: int = 0
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    error: Exception | None = None


class Engine:
    def __init__(self, model: Mixtral, moe: MoeFn, tokenizer: Tokenizer, *,
                 device: str | torch.device = "cpu", max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 block_size: int | None = None, kv_cache_memory: int | None = None,
                 attention_backend: str | None = None, max_waiting: int = 4096):
        self.cfg: MixtralConfig = model.cfg
        self.model, self.moe, self.tokenizer = model, moe, tokenizer
        self.device = torch.device(device)
        self.dtype = model.lm_head.weight.dtype
        self.backend = select_backend(self.device, attention_backend)
        self.block_size = block_size or (FLASH_BLOCK_SIZE if self.backend == "flash" else 16)
        self.max_model_len = min(max_model_len or self.cfg.max_position_embeddings,
                                 self.cfg.max_position_embeddings)
        self.kv = self._allocate_kv_cache(kv_cache_memory, max_num_seqs)
        self.scheduler = Scheduler(self.kv.allocator, self.block_size, max_num_seqs,
                                   max_num_batched_tokens)
        self.max_waiting = max_waiting
        self._tracked: dict[str, _Tracked] = {}
        self._completions: dict[str, Completion] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._sinks: dict[str, Callable[[StreamChunk | BaseException], None]] = {}
        self._loop_task: asyncio.Task | None = None
        # one thread runs the streams' steps, so they do not hop over a pool of threads (each
        # thread that runs torch gets its own OpenMP pool; here two such threads slowed each other)
        self._stepper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        log.info("engine ready: %s, %s, attention %s, %d KV blocks of %d tokens",
                 self.device, self.dtype, self.backend, self.kv.allocator.num_blocks,
                 self.block_size)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", **engine_args) -> "Engine":
        return cls.from_source(WeightSource(path=str(path)), dtype, device, **engine_args)

    @classmethod
    def from_config(cls, preset_or_config, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu", seed: int = 0, **engine_args) -> "Engine":
        """Random weights built in memory on `device` (no files): the same values as
        `python -m model.checkpoint random --seed` writes when built on the CPU."""
        source = WeightSource(config=resolve_config(preset_or_config), seed=seed)
        return cls.from_source(source, dtype, device, **engine_args)

    @classmethod
    def from_source(cls, source: WeightSource, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu", **engine_args) -> "Engine":
        cfg = source.model_config()
        tensors = source.load(list(tensor_shapes(cfg)), torch_dtype(dtype), device)
        experts = LocalExperts.from_tensors(cfg, tensors)          # pops the expert tensors
        model = Mixtral.from_tensors(cfg, tensors)
        tokenizer = Tokenizer.from_pretrained(source.path)
        return cls(model, experts.moe, tokenizer, device=device, **engine_args)

    def _allocate_kv_cache(self, memory: int | None, max_num_seqs: int) -> KVCache:
        c = self.cfg
        per_block = KVCache.bytes_per_block(c.num_hidden_layers, self.block_size,
                                            c.num_key_value_heads, c.head_dim, self.dtype)
        if memory is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                memory = int(free * 0.9)
            else:
                memory = 512 * 2**20
        useful = max_num_seqs * -(-self.max_model_len // self.block_size)
        num_blocks = min(memory // per_block, useful)
        if num_blocks * self.block_size < self.max_model_len:
            raise ValueError(f"kv_cache_memory ({memory} bytes) holds {num_blocks} blocks, fewer "
                             f"than one max_model_len ({self.max_model_len}) sequence needs")
        return KVCache(c.num_hidden_layers, num_blocks, self.block_size, c.num_key_value_heads,
                       c.head_dim, self.dtype, self.device)

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None) -> str:
        """Validate and queue a request; `params=None` asks for every position's logits."""
        ids = self._prompt_ids(prompt)
        limit = self.max_model_len
        if params is not None and len(ids) + params.max_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len ({limit})")
        if params is None and len(ids) > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) exceeds max_model_len ({limit})")
        rid = str(next(self._ids))
        gen = make_generator(params, self.device) if params is not None else None
        req = Request(rid, ids, params, gen)
        tracked = _Tracked(req, self.tokenizer.detokenizer() if params is not None else None)
        with self._lock:
            if len(self.scheduler.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.scheduler.waiting)} requests are waiting "
                                f"(max_waiting={self.max_waiting}); try again later")
            self._tracked[rid] = tracked
            self.scheduler.add(req)
        return rid

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids or prompt == "":
            raise ValueError("prompt must not be empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size}), got {bad[:5]}")
        return ids

    def abort(self, request_id: str) -> None:
        """Drop a request now and return its KV blocks (no-op if it already finished)."""
        with self._lock:
            tracked = self._tracked.pop(request_id, None)
            if tracked is not None and not tracked.req.finished:
                tracked.req.finish_reason = "abort"
                self.scheduler.finish(tracked.req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_free_blocks(self) -> int:
        return self.kv.allocator.num_free

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[StreamChunk]:
        """Run one scheduler step; return what each request produced in it, and hand each
        chunk to its request's sink (streams). If the step fails, its requests fail with the
        error (their sinks get it) and it is raised; other requests carry on."""
        with self._lock:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return []
            try:
                hidden = self._forward(scheduled)                         # (N, D)
                chunks = self._process(scheduled, hidden)
            except Exception as e:
                for req, _ in scheduled:
                    self._fail(req, e)
                raise
        for chunk in chunks:
            sink = self._sinks.get(chunk.request_id)
            if sink is not None:
                sink(chunk)
        return chunks

    def _fail(self, req: Request, error: Exception) -> None:
        tracked = self._tracked.get(req.request_id)
        req.finish_reason = "error"
        self.scheduler.finish(req)
        if tracked is not None:
            tracked.error = error
        sink = self._sinks.get(req.request_id)
        if sink is not None:
            sink(error)

    def _forward(self, scheduled: list[tuple[Request, int]]) -> torch.Tensor:
        ids, q_lens, ctx_lens, tables = [], [], [], []
        for req, n in scheduled:
            ids += req.all_ids[req.num_computed:req.num_computed + n]
            q_lens.append(n)
            ctx_lens.append(req.num_computed + n)
            tables.append(req.block_table)
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, self.block_size,
                                       self.cfg.sliding_window, self.backend, self.device)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return self.model(input_ids, meta, self.kv, self.moe)

    def _process(self, scheduled, hidden: torch.Tensor) -> list[StreamChunk]:
        rows, sampling, start = [], [], 0
        for req, n in scheduled:
            req.num_computed += n
            done = req.num_computed == req.num_tokens
            if req.params is None:
                self._tracked[req.request_id].logits.append(
                    self.model.compute_logits(hidden[start:start + n]).cpu())
                if done:
                    req.finish_reason = "stop"
                    self.scheduler.finish(req)
            elif done:
                rows.append(start + n - 1)
                sampling.append(req)
            start += n
        if not sampling:
            return []
        logits = self.model.compute_logits(hidden[rows])                  # (B, V)
        tokens, logprobs = sample(logits, [r.params for r in sampling],
                                  [r.generator for r in sampling])
        return [self._append(req, t, lp) for req, t, lp in zip(sampling, tokens, logprobs)]

    def _append(self, req: Request, token: int, logprob: float) -> StreamChunk:
        tracked, p = self._tracked[req.request_id], req.params
        req.output_ids.append(token)
        req.logprobs.append(logprob)
        if token in p.stop_token_ids or (token == self.cfg.eos_token_id and not p.ignore_eos):
            req.finish_reason = "stop"
        else:
            tracked.text += tracked.detok.push(token)
            if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
                req.finish_reason = "length"
        if req.finished:
            tracked.text += tracked.detok.flush()
        self._cut_at_stop_string(tracked)
        if req.finished:
            self.scheduler.finish(req)
        return self._chunk(tracked)

    def _cut_at_stop_string(self, tracked: _Tracked) -> None:
        longest = max((len(s) for s in tracked.req.params.stop), default=0)
        if not longest:
            return
        begin = max(0, tracked.emitted_text - longest)
        hits = [i for s in tracked.req.params.stop if (i := tracked.text.find(s, begin)) >= 0]
        if hits:
            tracked.text = tracked.text[:min(hits)]
            tracked.req.finish_reason = "stop"

    def _chunk(self, tracked: _Tracked) -> StreamChunk:
        req = tracked.req
        hold = 0 if req.finished else max((len(s) - 1 for s in req.params.stop), default=0)
        end = max(tracked.emitted_text, len(tracked.text) - hold)
        chunk = StreamChunk(req.request_id, tracked.text[tracked.emitted_text:end],
                            req.output_ids[tracked.emitted_tokens:],
                            req.logprobs[tracked.emitted_tokens:], req.finish_reason)
        tracked.emitted_text, tracked.emitted_tokens = end, len(req.output_ids)
        return chunk

    # ---- synchronous API ----------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Run prompts through the continuous-batching scheduler until all finish."""
        prompts = _as_prompt_list(prompts)
        per_prompt = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
        try:
            self._run_until_done(rids)
        finally:
            for rid in rids:
                self.abort(rid)
        return [self._completions.pop(rid) for rid in rids]

    def logits(self, prompts: Prompt | Sequence[Prompt]) -> torch.Tensor | list[torch.Tensor]:
        """(T, V) float32 logits of every position of one prompt (a list of them for a list)."""
        single = not _is_prompt_list(prompts)
        rids = [self.add_request(p, None) for p in _as_prompt_list(prompts)]
        try:
            self._run_until_done(rids)
            out = [torch.cat(self._tracked[rid].logits) for rid in rids]
        finally:
            for rid in rids:
                self.abort(rid)
        return out[0] if single else out

    def _run_until_done(self, rids: list[str]) -> None:
        pending = set(rids)
        while pending:
            self.step()
            for rid in list(pending):
                tracked = self._tracked[rid]
                if tracked.error is not None:
                    raise tracked.error
                if tracked.req.finished:
                    pending.discard(rid)
                    if tracked.req.params is not None:
                        self._completions[rid] = self._completion(tracked)

    @staticmethod
    def _completion(tracked: _Tracked) -> Completion:
        r = tracked.req
        return Completion(r.request_id, r.prompt_ids, list(r.output_ids), tracked.text,
                          r.finish_reason, list(r.logprobs))

    # ---- asynchronous API ---------------------------------------------------------------
    async def stream(self, prompt: Prompt, params: SamplingParams = SamplingParams()
                     ) -> AsyncIterator[StreamChunk]:
        """Yield a chunk per generated token; the last one carries finish_reason.
        Leaving the iterator early aborts the request and frees its KV blocks."""
        rid = self.add_request(prompt, params)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._sinks[rid] = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
        self._ensure_loop()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._sinks.pop(rid, None)
            self.abort(rid)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        """Steps the engine while streams wait. Chunks reach streams through their sinks, so
        steps driven by `generate` in another thread lose nothing either."""
        while self._sinks and self.has_unfinished():
            try:
                await asyncio.get_running_loop().run_in_executor(self._stepper, self.step)
            except Exception:  # the failed step's requests got the error; others go on
                log.exception("engine step failed")


def _is_prompt_list(prompts) -> bool:
    return not isinstance(prompts, str) and len(prompts) > 0 and not isinstance(prompts[0], int)


def _as_prompt_list(prompts) -> list[Prompt]:
    return list(prompts) if _is_prompt_list(prompts) else [prompts]
