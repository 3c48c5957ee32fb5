"""What a step's hidden states become, per request: the engine's step outputs (a mixin of
model/engine.py's Engine, which owns the state it reads: model, scheduler, tracked requests,
streams, generator).

For each scheduled sequence: a logits request keeps its positions' logits; a sampling request
scores the prompt positions just computed when it asked for prompt logprobs (each prompt token
once, even across preemption), and once its prompt is computed, forks into its n choices
(sharing the prompt's KV blocks, model/scheduler.py) and samples (model/sampler.py) or, with
max_tokens 0, ends; each sampled token goes through its choice's RequestOutput (text, stop
conditions, the chunk it releases). A constrained sequence's logits are masked by its grammar
matcher (model/grammar.py: one bitmask for the step's constrained rows, filled before the
logits) and its token consumed by it; a forked choice gets a copy of the matcher. A grammar
that allows nothing but EOS ends its sequence "stop" before sampling; one that fails (its
limits, a mask over MAX_MASK_MS) fails its request (InvalidRequest naming the constraint's
field). A failure fails its request only, all of its choices.
Shapes: N tokens in the step (packed), D hidden, V vocab, B sequences that sample.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
from typing import TYPE_CHECKING

import torch

from model.grammar import CompiledGrammar, fill_masks
from model.output import RequestOutput, StreamChunk
from model.sampling import Sampled, SamplingRow, choice_seed, sample, token_seed
from model.scheduler import Request

if TYPE_CHECKING:
    from model.config import MixtralConfig
    from model.mixtral import Mixtral
    from model.scheduler import Scheduler
    from model.streaming import Streams
    from model.tokenizer import Tokenizer

log = logging.getLogger("model.engine")


@dataclasses.dataclass(eq=False)
class Tracked:
    """Engine-side state of a request from admission until its caller lets go of it."""
    reqs: list[Request]                          # one sequence, or its n choices once forked
    outputs: dict[int, RequestOutput]            # by choice index; empty for a logits request
    choices: int = 1                             # choices its stream ends after
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    error: Exception | None = None
    # the constraint's compile, while the request is held for it (model/engine.py); else None
    grammar: concurrent.futures.Future[CompiledGrammar] | None = None

    @property
    def req(self) -> Request:
        return self.reqs[0]

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.reqs) and not any(r.num_forks for r in self.reqs)


class StepOutputs:
    """Engine's per-request handling of a step's hidden states (see the module docstring)."""
    model: Mixtral
    cfg: MixtralConfig
    tokenizer: Tokenizer
    max_model_len: int
    scheduler: Scheduler
    _tracked: dict[str, Tracked]
    _streams: Streams
    _generator: torch.Generator

    def _output(self, req: Request, grammar: CompiledGrammar | None = None) -> RequestOutput:
        """A sampling sequence's text side: completion text after its prompt, stop rules; with
        a grammar, the sequence's matcher at the grammar's start."""
        output = RequestOutput(req, self.tokenizer.detokenizer(req.prompt_ids),
                               self.cfg.eos_token_id, self.max_model_len)
        if grammar is not None:
            req.matcher = grammar.matcher(req.params.constraint.field)
            output.strip_leading_space = grammar.strip_leading_space
        return output

    def _process(self, scheduled, hidden: torch.Tensor) -> list[StreamChunk]:
        rows, sampling, chunks, start = [], [], [], 0
        for req, n in scheduled:
            first = req.num_computed
            req.num_computed += n
            done = req.num_computed == req.num_tokens
            if req.params is None:
                self._keep_logits(req, hidden[start:start + n], done)
            else:
                tracked = self._tracked[req.request_id]
                if tracked.outputs[req.index].prompt_pending:
                    self._score_prompt(req, tracked.outputs[req.index], hidden[start:start + n],
                                       first)
                if done and not req.finished:
                    for seq in self._fork(tracked, req):
                        if seq.params.max_tokens == 0:       # a prompt scored, nothing sampled
                            chunks.append(self._emit(seq, tracked.outputs[seq.index].finish))
                        else:
                            rows.append(start + n - 1)
                            sampling.append(seq)
            start += n
        if sampling:
            chunks += self._sample(sampling, hidden[rows])
        return [c for c in chunks if c is not None]

    def _sample(self, sampling: list[Request], hidden: torch.Tensor) -> list[StreamChunk | None]:
        masks, chunks = self._grammar_masks(sampling)
        live = [i for i, req in enumerate(sampling) if not req.finished]
        if len(live) < len(sampling):           # ended by their grammar, or failed by it
            sampling, masks, hidden = ([sampling[i] for i in live], [masks[i] for i in live],
                                       hidden[live])
        if not sampling:
            return chunks
        try:
            logits = self.model.compute_logits(hidden)                        # (B, V)
            rows = [SamplingRow(r.params, None if r.seed is None else token_seed(
                        r.seed, r.num_tokens), r.prompt_ids, r.output_ids, r.sampling_state,
                        mask) for r, mask in zip(sampling, masks)]  # seeded by the position
            sampled = sample(logits, rows, self.cfg.eos_token_id, self._generator)
        except Exception as e:
            for req in sampling:
                self._fail(req, e)
            raise
        return chunks + [self._append(req, result) for req, result in zip(sampling, sampled)]

    def _grammar_masks(self, sampling: list[Request]
                       ) -> tuple[list[torch.Tensor | None], list[StreamChunk | None]]:
        """Each sequence's grammar mask ((V,) bool; None if unconstrained), and the chunks of
        the constrained sequences that end here without sampling: a grammar that can take
        nothing but EOS ends its sequence "stop" (whatever min_tokens says); one that fails
        (llguidance's limits, MAX_MASK_MS for a request's rows together) fails its request
        alone (InvalidRequest)."""
        masks: list[torch.Tensor | None] = [None] * len(sampling)
        constrained = [i for i, r in enumerate(sampling) if r.matcher is not None]
        if not constrained:
            return masks, []
        errors: dict = {}
        filled = fill_masks([sampling[i].matcher for i in constrained], self.cfg.vocab_size,
                            self.device, errors, [sampling[i].request_id for i in constrained])
        chunks = []
        for k, i in enumerate(constrained):
            req = sampling[i]
            if k in errors:
                if not req.finished:                # not failed with a sibling choice
                    self._fail(req, errors[k])
            elif req.matcher.finished and not req.finished:
                output = self._tracked[req.request_id].outputs[req.index]
                chunks.append(self._emit(req, functools.partial(output.finish, "stop")))
            else:
                masks[i] = filled[k]
        return masks, chunks

    def _fork(self, tracked: Tracked, req: Request) -> list[Request]:
        """The sequences that sample from `req`'s last prompt position: itself and, the first
        time, the n - 1 other choices forked from it (sharing its KV blocks; choice i seeded
        `choice_seed(seed, i)`)."""
        if not req.num_forks:
            return [req]
        seeds = [None if req.seed is None else choice_seed(req.seed, i)
                 for i in range(1, req.num_forks + 1)]
        children = self.scheduler.fork(req, seeds)
        parent = tracked.outputs[req.index]
        for child in children:
            output = tracked.outputs[child.index] = self._output(child)
            output.strip_leading_space = parent.strip_leading_space
            child.matcher = None if req.matcher is None else req.matcher.copy()
            output.prompt_logprobs, output.prompt_pending = (parent.prompt_logprobs,
                                                             parent.prompt_pending)
        tracked.reqs += children
        return [req, *children]

    def _score_prompt(self, req: Request, output: RequestOutput, hidden: torch.Tensor,
                      first: int) -> None:
        """The prompt logprobs that the positions [first, first + len(hidden)) just computed
        give: prompt token t's raw logprob, top alternatives and rank from position t - 1's
        logits, for the tokens not scored yet (a preempted request scores each once)."""
        k = req.params.prompt_logprobs
        lo = max(len(output.prompt_logprobs), first + 1)
        hi = min(first + len(hidden), len(req.prompt_ids) - 1)            # last token scored
        if lo > hi:
            return
        try:
            logprobs = torch.log_softmax(
                self.model.compute_logits(hidden[lo - 1 - first:hi - first]).float(), dim=-1)
            targets = torch.tensor(req.prompt_ids[lo:hi + 1], device=logprobs.device)
            chosen = logprobs.gather(1, targets[:, None])                    # (T', 1)
            ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
            chosen = chosen[:, 0].tolist()
            tops = [[]] * len(chosen)
            if k:
                values, ids = logprobs.topk(k, dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        except Exception as e:  # noqa: BLE001 - this request's failure only
            self._fail(req, e)
            return
        output.prompt_logprobs += list(zip(chosen, tops, ranks))

    def _keep_logits(self, req: Request, hidden: torch.Tensor, done: bool) -> None:
        try:
            self._tracked[req.request_id].logits.append(self.model.compute_logits(hidden).cpu())
        except Exception as e:  # noqa: BLE001 - this request's failure only
            self._fail(req, e)
            return
        if done:
            req.finish_reason = "stop"
            self.scheduler.finish(req)

    def _append(self, req: Request, result: Sampled) -> StreamChunk | None:
        """Add a sampled token to its sequence; a failure fails its request only."""
        if isinstance(result, Exception):
            self._fail(req, result)
            return None
        return self._emit(req, lambda: self._tracked[req.request_id].outputs[req.index].append(
            result.token, result.logprob, result.top))

    def _emit(self, req: Request, make_chunk) -> StreamChunk | None:
        """The chunk `make_chunk()` releases for a sequence still running (None if it failed:
        its request fails); a finished sequence returns its blocks."""
        if req.finished:                 # failed with a sibling choice this step
            return None
        try:
            chunk = make_chunk()
        except Exception as e:  # noqa: BLE001
            self._fail(req, e)
            return None
        if req.finished:
            self.scheduler.finish(req)
        return chunk

    def _fail(self, req: Request, error: Exception) -> None:
        """Fail a request, all of its choices, and hand its stream the error."""
        log.warning("request %s failed: %s: %s", req.request_id, type(error).__name__, error)
        tracked = self._tracked.get(req.request_id)
        for seq in tracked.reqs if tracked is not None else [req]:
            if not seq.finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
        if tracked is not None:
            tracked.error = error
        self._streams.deliver(req.request_id, error)
