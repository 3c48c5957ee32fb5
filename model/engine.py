"""The in-process engine: admission -> scheduler -> one model step over a packed batch -> sampler.

It is the reference every distributed path must equal: the Ray frontend (actors/) runs this
same class with its dispatcher as the `moe` function instead of local experts. The engine knows
tokens; text goes through `Tokenizer` at the edges and `model/output.py` (completion text, stop
conditions, chunks); asyncio streams through `model/streaming.py`; what a step's hidden states
become per request (logits, prompt logprobs, n choices forked, sampled tokens) is
`model/step_outputs.py`; what waits for a step boundary (adds, aborts, requests held for their
grammar) is `model/between_steps.py`.

    engine = Engine.from_pretrained(path, dtype="float32")
    outs = engine.generate(["a prompt", [1, 733, 16289]],
                           SamplingParams(max_tokens=20, temperature=0))
    logits = engine.logits([1, 733, 16289])                  # (T, V) float32, every position
    async for chunk in engine.stream("a prompt", params): ...

Text prompts are encoded with BOS. Admission is atomic: every request of a call is validated
(InvalidRequest naming the field and its limit) before any is queued, so after an error nothing of
that call is tracked, waiting or running. Adds and aborts never wait for a running step: they are
queued and applied at the next step boundary (at once when no step runs), so a new stream or a
client going away never stalls the others; so is `run_between_steps(fn)`. One request's failure
(its logits not finite, its sampling or detokenization failing) fails that request only; a failed
forward pass fails the requests of that step and is raised. KV sizing: model/kv_sizing.py.
Prefix caching (on unless `enable_prefix_caching=False`): full KV blocks are reused across
requests by content (model/prefix_cache.py, model/scheduler.py); outputs are the same with it
or without, and each request reports the prompt tokens it found cached (`cached_tokens`).
Structured outputs (`SamplingParams.constraint`): the grammar is compiled on the tokenizer's
compiler thread (model/grammar.py), never in a step: `stream` and `generate` wait for it before
admitting the request (a grammar that does not compile is an InvalidRequest naming its field);
`add_request` holds the request, unscheduled, until it is compiled (a failure fails it alone).
Shapes: N tokens in the step (packed), D hidden, V vocab, B sequences that sample.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch

from model.admission import Prompt, as_prompt_list, check_request, is_prompt_list, prompt_ids
from model.attention import FLASH_BLOCK_SIZE, AttentionMetadata, KVCache, select_backend
from model.between_steps import BetweenSteps
from model.checkpoint import WeightSource
from model.config import MixtralConfig, resolve_config
from model.errors import InvalidRequest, QueueFull
from model.grammar import compiler_for
from model.kv_sizing import size_kv_cache
from model.mixtral import Mixtral, MoeBeginFn, MoeFn, tensor_shapes
from model.moe import LocalExperts
from model.output import Completion, Resume, StreamChunk, check_resumes
from model.prefix_cache import weights_salt
from model.sampling import SamplingParams, choice_seed, request_seed
from model.scheduler import Request, Scheduler
from model.step_outputs import StepOutputs, Tracked
from model.streaming import Streams
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["Engine", "SamplingParams", "Completion", "StreamChunk", "Resume", "QueueFull",
           "InvalidRequest"]

class Engine(BetweenSteps, StepOutputs):
    def __init__(self, model: Mixtral, moe: MoeFn, tokenizer: Tokenizer, *,
                 device: str | torch.device = "cpu", max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 block_size: int | None = None, kv_cache_memory: int | None = None,
                 attention_backend: str | None = None, max_waiting: int = 4096,
                 moe_begin: MoeBeginFn | None = None, micro_batches: int = 1,
                 enable_prefix_caching: bool = True):
        if micro_batches not in (1, 2) or (micro_batches == 2 and moe_begin is None):
            raise ValueError(f"micro_batches must be 1, or 2 with a moe_begin; got {micro_batches}")
        self.cfg: MixtralConfig = model.cfg
        self.model, self.moe, self.tokenizer = model, moe, tokenizer
        self.moe_begin, self.micro_batches = moe_begin, micro_batches
        self.device = torch.device(device)
        self.dtype = model.lm_head.weight.dtype
        self.backend = select_backend(self.device, attention_backend)
        self.block_size = block_size or (FLASH_BLOCK_SIZE if self.backend == "flash" else 16)
        size = size_kv_cache(self.cfg, self.block_size, self.dtype, self.device, kv_cache_memory,
                             max_model_len, max_num_seqs)
        self.max_model_len = size.max_model_len
        c = self.cfg
        self.kv = KVCache(c.num_hidden_layers, size.num_blocks, self.block_size,
                          c.num_key_value_heads, c.head_dim, self.dtype, self.device)
        salt = weights_salt(model, self.dtype) if enable_prefix_caching else None
        self.scheduler = Scheduler(self.kv.allocator, self.block_size, max_num_seqs,
                                   max_num_batched_tokens, cache_salt=salt)
        self.max_waiting = max_waiting
        self._tracked: dict[str, Tracked] = {}
        self._ids = itertools.count()
        self.step_lock = threading.RLock()  # held for a whole step; other users of the model too
        self._pending_lock = threading.Lock()     # held for microseconds: adds and aborts
        # admitted requests, ids to abort and (fn, future) to run between steps, in order
        self._pending: list[Tracked | str | tuple] = []
        self._held: list[Tracked] = []          # admitted, waiting for their grammar's compile
        self.grammars = compiler_for(tokenizer)
        self._streams = Streams(self.step, self.has_unfinished)
        self._generator = torch.Generator(device=self.device)   # reseeded for every draw
        log.info("engine ready: %s, %s, attention %s, %d KV blocks of %d tokens, max_model_len "
                 "%d, prefix caching %s", self.device, self.dtype, self.backend,
                 size.num_blocks, self.block_size, self.max_model_len,
                 "on" if enable_prefix_caching else "off")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", quantization: str | None = None,
                        **engine_args) -> Engine:
        """`quantization`: "int8" quantizes the expert weights at load (model/quant.py); an
        FP8 checkpoint is read as FP8 without it. ValueError naming a bad one."""
        source = WeightSource(path=str(path), quantization=quantization)
        return cls.from_source(source, dtype, device, **engine_args)

    @classmethod
    def from_config(cls, preset_or_config, dtype: str | torch.dtype = "auto",
                    device: str | torch.device = "cpu", seed: int = 0,
                    quantization: str | None = None, **engine_args) -> Engine:
        """Random weights built in memory on `device` (no files): the same values as
        `python -m model.random_checkpoint --seed` writes when built on the CPU."""
        source = WeightSource(config=resolve_config(preset_or_config), seed=seed,
                              quantization=quantization)
        return cls.from_source(source, dtype, device, **engine_args)

    @classmethod
    def from_source(cls, source: WeightSource, dtype: str | torch.dtype = "auto",
                    device: str | torch.device = "cpu", **engine_args) -> Engine:
        cfg = source.model_config()
        tensors = source.load(list(tensor_shapes(cfg)), source.resolve_dtype(dtype, device),
                              device)
        experts = LocalExperts.from_tensors(cfg, tensors)          # pops the expert tensors
        model = Mixtral.from_tensors(cfg, tensors)
        tokenizer = Tokenizer.from_pretrained(source.path)
        return cls(model, experts.moe, tokenizer, device=device, moe_begin=experts.moe_begin,
                   **engine_args)

    # ---- admission ----------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None) -> str:
        """Validate and queue a request; `params=None` asks for every position's logits.
        Raises InvalidRequest (a bad field) or QueueFull; never waits for a running step."""
        tracked = self._prepare(prompt, params)
        self._admit([tracked])
        return tracked.req.request_id

    def _prepare(self, prompt: Prompt, params: SamplingParams | None,
                 resume: Resume | Sequence[Resume] | None = None) -> Tracked:
        """Everything that can reject a request (model/admission.py), with no side effect.
        A fresh request is one sequence (forked into its n choices once its prompt is
        computed); a resumed one is a sequence per unfinished choice, each prefilling prompt +
        its tokens so far."""
        vocab, limit = self.cfg.vocab_size, self.max_model_len
        ids = prompt_ids(prompt, self.tokenizer, vocab, limit)
        check_request(ids, params, limit, vocab)
        request_id = str(next(self._ids))
        if params is None:
            return Tracked([Request(request_id, ids, None)], {})
        if params.n > self.scheduler.max_num_seqs:
            raise InvalidRequest(f"n must be at most max_num_seqs ({self.scheduler.max_num_seqs})"
                                 f", got {params.n}")
        seed = request_seed(params)
        resumes = check_resumes(resume, params.n)
        future = None if params.constraint is None else self.grammars.compile(params.constraint)
        # ready (cached, or awaited by stream and generate): InvalidRequest here if it failed;
        # a resumed request replays its tokens through the matcher, so it needs it now
        grammar = future.result() if future is not None and (future.done() or resumes) else None
        if resumes is None:
            req = Request(request_id, ids, params, seed, num_forks=params.n - 1)
            tracked = Tracked([req], {0: self._output(req, grammar)}, choices=params.n)
            if future is not None and grammar is None:      # held until compiled: _start
                tracked.grammar = future
                future.add_done_callback(lambda _: self._release(tracked))
            return tracked
        tracked = Tracked([], {}, choices=len(resumes))
        for state in resumes:
            req = Request(request_id, ids, params,
                          None if seed is None else choice_seed(seed, state.index),
                          index=state.index)
            tracked.reqs.append(req)
            tracked.outputs[state.index] = self._output(req, grammar)
            tracked.outputs[state.index].resume(state)
        return tracked

    def num_free_blocks(self) -> int:
        return self.kv.allocator.num_free

    def num_tracked(self) -> int:
        """Requests the engine holds state for (admitted and not yet let go of)."""
        return len(self._tracked)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[StreamChunk]:
        """Run one scheduler step; return what each request produced in it, and hand each
        chunk to its request's stream. If the forward pass fails, the step's requests fail
        with the error (their streams get it) and it is raised; other requests carry on.
        Chunks are handed over under the step lock: steps run by two threads (a `generate`
        beside streams) deliver in step order."""
        try:
            with self.step_lock:
                self._apply_pending()
                scheduled = self.scheduler.schedule()
                try:
                    self.kv.copy_blocks(self.scheduler.take_copies())    # copy-on-write
                    chunks = self._run(scheduled) if scheduled else []
                finally:
                    self._apply_pending()
                for chunk in chunks:
                    self._streams.deliver(chunk.request_id, chunk)
        finally:  # an add or abort that found the lock taken queued itself before trying it
            self._apply_pending_if_idle()
        return chunks

    def _run(self, scheduled: list[tuple[Request, int]]) -> list[StreamChunk]:
        try:
            hidden = self._forward(scheduled)                         # (N, D)
        except Exception as e:
            self.scheduler.discard_step()              # its blocks' keys were not all written
            for req, _ in scheduled:
                self._fail(req, e)
            raise
        return self._process(scheduled, hidden)

    def _forward(self, scheduled: list[tuple[Request, int]]) -> torch.Tensor:
        """(N, D) hidden states of the step's tokens, in `scheduled` order; with two
        micro-batches, each half of the sequences overlaps its expert round trip with the
        other's attention (Mixtral.forward_micro_batches)."""
        parts = _halves(scheduled) if self.micro_batches == 2 else [scheduled]
        if len(parts) == 1:
            return self.model(*self._inputs(scheduled), self.kv, self.moe)
        inputs = [self._inputs(part) for part in parts]
        return torch.cat(self.model.forward_micro_batches(
            [ids for ids, _ in inputs], [meta for _, meta in inputs], self.kv, self.moe_begin))

    def _inputs(self, scheduled: list[tuple[Request, int]]
                ) -> tuple[torch.Tensor, AttentionMetadata]:
        ids, q_lens, ctx_lens, tables = [], [], [], []
        for req, n in scheduled:
            ids += req.all_ids[req.num_computed:req.num_computed + n]
            q_lens.append(n)
            ctx_lens.append(req.num_computed + n)
            tables.append(req.block_table)
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, self.block_size,
                                       self.cfg.sliding_window, self.backend, self.device)
        return torch.tensor(ids, dtype=torch.int64, device=self.device), meta

    # ---- synchronous API ----------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
                 ) -> list[Completion]:
        """Run prompts through the continuous-batching scheduler until all finish.
        Raises InvalidRequest before queueing any if one is invalid, or the first error."""
        prompts = as_prompt_list(prompts)
        per_prompt = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise InvalidRequest(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        for sp in per_prompt:                  # compiled (or refused) before any is queued
            if sp is not None and sp.constraint is not None:
                self.grammars.compile(sp.constraint).result()
        done = self._run_batch([self._prepare(p, sp) for p, sp in zip(prompts, per_prompt)])
        return [t.outputs[i].completion() for t in done for i in sorted(t.outputs)]

    def logits(self, prompts: Prompt | Sequence[Prompt]) -> torch.Tensor | list[torch.Tensor]:
        """(T, V) float32 logits of every position of one prompt (a list of them for a list)."""
        done = self._run_batch([self._prepare(p, None) for p in as_prompt_list(prompts)])
        out = [torch.cat(t.logits) for t in done]
        return out if is_prompt_list(prompts) else out[0]

    def _run_batch(self, batch: list[Tracked]) -> list[Tracked]:
        """Admit a validated batch, step until all finish, then let go of them."""
        self._admit(batch)
        try:
            pending = list(batch)
            while pending:
                self.step()
                for tracked in pending:
                    if tracked.error is not None:
                        raise tracked.error
                pending = [t for t in pending if not t.finished]
        finally:
            for tracked in batch:
                self.abort(tracked.req.request_id)
        return batch

    # ---- asynchronous API ---------------------------------------------------------------
    async def stream(self, prompt: Prompt, params: SamplingParams = SamplingParams(),
                     resume: Resume | Sequence[Resume] | None = None
                     ) -> AsyncIterator[StreamChunk]:
        """Yield a chunk per generated token of each choice (n > 1: interleaved, each with its
        `index`); a choice's last chunk carries its finish_reason, and the stream ends when
        every choice has one. Leaving the iterator early aborts the request and frees its KV
        blocks. `resume`: go on from where a dead engine's stream of the same request left off
        (model/output.py): one Resume per unfinished choice. A constraint's grammar is
        compiled (off the event loop) before the request is admitted."""
        if params.constraint is not None:
            await asyncio.wrap_future(self.grammars.compile(params.constraint))
        tracked = self._prepare(prompt, params, resume)
        async for chunk in self._streams.follow(tracked.req.request_id,
                                                lambda: self._admit([tracked]), self.abort,
                                                choices=tracked.choices):
            yield chunk


def _halves(scheduled: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
    """Split a step's sequences in two runs of about equal token counts (one if it has one)."""
    total, running = sum(n for _, n in scheduled), 0
    for i, (_, n) in enumerate(scheduled[:-1]):
        running += n
        if 2 * running >= total:
            return [scheduled[:i + 1], scheduled[i + 1:]]
    return [scheduled]

