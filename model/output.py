"""What a client sees of one request: its completion text, stop conditions, and stream chunks.

Completion text is what the completion adds to the prompt's text: `decode(prompt + output)`
minus `decode(prompt)`, so the first token keeps its leading space (`"▁db"` -> `" db"`) as
vLLM, TGI and llama.cpp return it; the detokenizer is started after the prompt
(`Tokenizer.detokenizer(prompt_ids)`) to get exactly that, one token at a time.

Stop conditions, in order, after each token: a stop token id or EOS (unless `ignore_eos`) ends
the request with "stop" and its text is not added; `max_tokens` or the context length ends it
with "length"; then the text is cut before the first stop string, if any ("stop").
Structured outputs (model/grammar.py): each token is consumed by the sequence's grammar matcher
before its text is added (a token the grammar rejects fails the request), and a sequence whose
grammar can take nothing but EOS ends at once with "stop", even before min_tokens (the
grammar's end wins): after a token, or before sampling when its mask allows only EOS (a
grammar of only "", with no token at all). When the grammar was wrapped with an optional
leading space, the text drops that one space (`strip_leading_space`): the completion is
exactly the document.
Streaming: each chunk carries the new token ids and the new text; while a request runs, the
last `len(longest stop string) - 1` characters are held back, since they may be the start of a
stop string, so text after a stop is never streamed. Deltas never split a character, and they
concatenate to the completion's text.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from model.errors import InvalidRequest
from model.sampling import SamplingError, TopLogprobs
from model.scheduler import Request

if TYPE_CHECKING:
    from model.detokenizer import IncrementalDetokenizer


# a prompt token's raw logprob, its `prompt_logprobs` most likely alternatives and its rank
# (1 + the number of tokens more likely than it, as vLLM's); None for the first prompt token
# (nothing precedes it)
PromptLogprob = tuple[float, TopLogprobs, int] | None


@dataclasses.dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]        # includes the token that stopped it (EOS or a stop token id)
    text: str                   # excludes it, and ends before the first stop string
    finish_reason: str          # "length" | "stop"
    logprobs: list[float]
    index: int = 0              # the choice (n > 1)
    top_logprobs: list[TopLogprobs] = dataclasses.field(default_factory=list)  # per token, if asked
    prompt_logprobs: list[PromptLogprob] | None = None     # per prompt token, if asked
    cached_tokens: int = 0      # prompt tokens whose KV came from the prefix cache (see below)


@dataclasses.dataclass
class StreamChunk:
    request_id: str
    text: str                   # new text since the previous chunk
    token_ids: list[int]        # new token ids
    logprobs: list[float]
    finish_reason: str | None = None    # this choice's; a request ends when all n have one
    index: int = 0                      # the choice (n > 1)
    top_logprobs: list[TopLogprobs] = dataclasses.field(default_factory=list)  # per new token
    # per prompt token, on the first chunk of each choice, when `prompt_logprobs` is asked
    prompt_logprobs: list[PromptLogprob] | None = None
    # prompt tokens whose KV this engine took from its prefix cache when it admitted the
    # request (vLLM's RequestOutput.num_cached_tokens): the same on every chunk and choice; a
    # resumed request (failover) reports the resuming engine's
    cached_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a request resumes after the engine that ran it died: the completion tokens (and
    their logprobs) its client already received, and how many characters of the completion's
    text it received (text can lag its tokens: held back for stop strings or an unfinished
    character). The new engine prefills prompt + these tokens and goes on from there; with
    token_seed's position-derived draws, the rest equals an undisturbed run."""
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text_chars: int
    top_logprobs: tuple[TopLogprobs, ...] = ()    # per token, when the request asks for them
    index: int = 0                                # the choice (n > 1): one Resume per unfinished


class RequestOutput:
    """The text side of one sampling request: detokenizes its tokens, applies its stop
    conditions and cuts its stream into chunks. Owned by the engine, touched under its lock."""

    def __init__(self, req: Request, detok: IncrementalDetokenizer, eos_token_id: int,
                 max_model_len: int):
        self.req, self.detok = req, detok
        self.eos_token_id, self.max_model_len = eos_token_id, max_model_len
        self.text = ""
        self.emitted_text = self.emitted_tokens = 0
        self.longest_stop = max((len(s) for s in req.params.stop), default=0)
        self.stop_after = 0             # a stop string must end past this (min_tokens' text)
        self.strip_leading_space = False    # set by the engine from the request's grammar
        # prompt logprobs, when asked: filled by the engine as the prompt is computed, sent
        # with the choice's first chunk (a resumed choice that sent tokens has sent them)
        asked = req.params.prompt_logprobs is not None
        self.prompt_logprobs: list[PromptLogprob] | None = [None] if asked else None
        self.prompt_pending = asked

    def resume(self, state: Resume) -> None:
        """Replay the tokens a client already has, as if this engine had generated them: same
        text, same stop-string state, nothing of them emitted again. InvalidRequest if they
        could not have been received from an unfinished request (ended by a stop token, EOS,
        max_tokens or the context; text that could not have been sent)."""
        req, n = self.req, len(state.token_ids)
        if len(state.logprobs) != n or len(state.top_logprobs) not in (0, n):
            raise InvalidRequest(f"resume: {n} token ids but {len(state.logprobs)} logprobs and "
                                 f"{len(state.top_logprobs)} top_logprobs")
        tops = state.top_logprobs or [[]] * n
        for token, logprob, top in zip(state.token_ids, state.logprobs, tops):
            if req.finished:
                break
            try:
                self.append(token, logprob, top)       # the stop conditions of a sampled token
            except (ValueError, SamplingError) as e:    # out of the vocabulary, or the grammar
                raise InvalidRequest(f"resume: {e}") from None
        if req.finished or not 0 <= state.text_chars <= len(self.text):
            raise InvalidRequest(f"resume: {len(state.token_ids)} tokens and {state.text_chars} "
                                 "characters are not the state of an unfinished request")
        self.emitted_text, self.emitted_tokens = state.text_chars, len(req.output_ids)
        self.prompt_pending = self.prompt_pending and n == 0

    def append(self, token: int, logprob: float, top: TopLogprobs = ()) -> StreamChunk:
        """Record one sampled token (its raw logprob and top alternatives); return the chunk it
        releases (finish_reason set if done)."""
        req, p = self.req, self.req.params
        if req.matcher is not None:
            req.matcher.consume(token)          # SamplingError if the grammar rejects it
        req.output_ids.append(token)
        req.logprobs.append(logprob)
        if p.top_logprobs:
            req.top_logprobs.append(list(top))
        if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
            req.finish_reason = "stop"
        else:
            self._add_text(self.detok.push(token))
            if req.matcher is not None and req.matcher.finished:
                req.finish_reason = "stop"
            elif len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
                req.finish_reason = "length"
        if req.finished:
            self._add_text(self.detok.flush())
        self._cut_at_stop_string()
        return self._chunk()

    def _add_text(self, piece: str) -> None:
        """Add detokenized text; the first character of a grammar-wrapped completion is
        dropped if it is the wrapper's optional space."""
        self.text += piece
        if self.strip_leading_space and self.text:
            self.strip_leading_space = False
            if self.text[0] == " ":
                self.text = self.text[1:]

    def finish(self, reason: str = "length") -> StreamChunk:
        """End a sequence without a new token: "length" for max_tokens 0 (its prompt scored),
        "stop" when its grammar can take nothing but EOS (before sampling)."""
        self.req.finish_reason = reason
        self._add_text(self.detok.flush())
        return self._chunk()

    def _cut_at_stop_string(self) -> None:
        if not self.longest_stop:
            return
        if len(self.req.output_ids) < self.req.params.min_tokens:
            self.stop_after = len(self.text)    # as vLLM: no stop string in the text so far
            return                              # ends it, nor before min_tokens
        begin = max(0, self.emitted_text - self.longest_stop,
                    self.stop_after - self.longest_stop + 1)
        hits = [i for s in self.req.params.stop if (i := self.text.find(s, begin)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.req.finish_reason = "stop"

    def _chunk(self) -> StreamChunk:
        req = self.req
        hold = 0 if req.finished else max(self.longest_stop - 1, 0)
        end = max(self.emitted_text, len(self.text) - hold)
        chunk = StreamChunk(req.request_id, self.text[self.emitted_text:end],
                            req.output_ids[self.emitted_tokens:],
                            req.logprobs[self.emitted_tokens:], req.finish_reason, req.index,
                            req.top_logprobs[self.emitted_tokens:],
                            cached_tokens=self.cached_tokens)
        if self.prompt_pending and len(self.prompt_logprobs) == len(req.prompt_ids):
            chunk.prompt_logprobs, self.prompt_pending = self.prompt_logprobs, False
        self.emitted_text, self.emitted_tokens = end, len(req.output_ids)
        return chunk

    def completion(self) -> Completion:
        r = self.req
        return Completion(r.request_id, r.prompt_ids, list(r.output_ids), self.text,
                          r.finish_reason, list(r.logprobs), r.index, list(r.top_logprobs),
                          self.prompt_logprobs, self.cached_tokens)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens its sequence took from the prefix cache (resumed tokens not counted)."""
        return min(self.req.num_cached_tokens or 0, len(self.req.prompt_ids))


def check_resumes(resume: Resume | Sequence[Resume] | None, n: int) -> tuple[Resume, ...] | None:
    """A stream's resume states, one per unfinished choice (a lone Resume is choice 0 of n = 1);
    None when the request starts afresh (nothing to resume: no choice has sent anything).
    InvalidRequest for indices outside [0, n) or repeated."""
    if resume is None:
        return None
    resumes = (resume,) if isinstance(resume, Resume) else tuple(resume)
    indices = [r.index for r in resumes]
    if not resumes or len(set(indices)) != len(indices) or not all(0 <= i < n for i in indices):
        raise InvalidRequest(f"resume: choice indices {indices} are not distinct choices of "
                             f"n = {n}")
    fresh = sorted(indices) == list(range(n)) and not any(r.token_ids or r.text_chars
                                                          for r in resumes)
    return None if fresh else resumes
