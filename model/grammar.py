"""Structured outputs in the engine: a Constraint (model/constraint.py) compiled by llguidance
into a grammar, one matcher per constrained sequence, and the token masks of a step.

    compiler = compiler_for(tokenizer)              # one per tokenizer, process-wide
    compiled = compiler.compile(constraint).result()  # a Future: never blocks the caller
    matcher = compiled.matcher()                    # per sequence; .copy() for n > 1 forks
    masks = fill_masks([matcher], vocab_size, device)   # (R, V) bool: the allowed tokens
    matcher.consume(token)                          # SamplingError if the grammar rejects it
    matcher.finished                                # nothing but EOS can follow: it ends

Kinds -> llguidance grammars: model/grammar_text.py. A grammar that does not compile, is over
LIMITS or matches no text (an empty language) is an InvalidRequest naming the constraint's
field and the reason; so is one that fails mid-generation ("the grammar failed at output token
37: it exceeded its limits: ...", or "...: it reached a part that matches no text" for a dead end
llguidance cannot see ahead, such as a recursive $ref behind a prefix) or whose work for one
token takes over MAX_MASK_MS.

The SentencePiece leading space: Mixtral's natural first token of an answer is "▁{", which a
JSON grammar rejects (no leading whitespace). When a grammar cannot start with a space, it is
compiled as `start: " "? <grammar>` and the completion text drops that one leading space
(`CompiledGrammar.strip_leading_space`): the text is exactly the document. A grammar that can
start with a space itself (a regex " ?a") is left as it is, so stripping is never ambiguous.

Compiling runs on one worker thread per compiler (never in the engine's step loop); compiled
grammars (and refusals) are cached by the constraint's content (kind and spec, not its field),
least recently used out first. Shapes: R constrained rows, V vocab, W = ceil(V / 32) words.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance as llg
import llguidance.numpy as llg_numpy
import numpy as np
import torch

from model.constraint import Constraint
from model.draw import SamplingError
from model.errors import InvalidRequest
from model.grammar_text import JSON_OPTIONS, GrammarError, grammar_text, with_leading_space

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

__all__ = ["CompiledGrammar", "GrammarMatcher", "GrammarCompiler", "GrammarError",
           "compiler_for", "check_constraint", "fill_masks", "JSON_OPTIONS", "LIMITS",
           "MAX_MASK_MS", "check_mask_time"]

# llguidance's resource limits on one grammar, on top of MAX_CONSTRAINT_CHARS (documented in
# docs/architecture.md): symbols in the compiled grammar, lexer states (~1-2 kB each), lexer work to
# build it (~50k/ms) and per token (~14k/ms), Earley items per token; errors without the
# parser state (no schema text in logs or replies)
LIMITS = dict(max_grammar_size=200_000, max_lexer_states=100_000, initial_lexer_fuel=1_000_000,
              step_lexer_fuel=200_000, step_max_items=50_000, verbose_errors=False)
# the most one row's grammar work per token may take (ms of this thread's CPU time, so a busy
# machine does not count: consuming the last token and filling the next mask, llguidance runs
# on the caller's thread): a grammar over it fails its request (InvalidRequest naming the
# field) instead of slowing every step of the engine. Typical schemas take 0.01-0.1 ms; the
# limit is 100x that, and a few such requests at once still cost the step K x the limit
MAX_MASK_MS = 10.0


class GrammarMatcher:
    """One constrained sequence's place in its grammar (engine-side, under the step lock).
    `field` is the request field its constraint came from: every failure names it."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, eos_id: int,
                 field: str = "constraint", consumed: int = 0):
        self._m, self.vocab_size, self.eos_id, self.field = matcher, vocab_size, eos_id, field
        self.consumed = consumed            # output tokens consumed so far
        self._only_eos = False              # the last mask allowed nothing but EOS
        self._consume_s = 0.0               # the time the last consume took
        self.last_ms = 0.0                  # the last token's grammar work (consume + fill)

    def consume(self, token_id: int) -> None:
        """Advance by one token. SamplingError if the grammar rejects it (a resumed request's
        token); InvalidRequest naming the field if llguidance fails on it (its limits: too
        many Earley items, lexer states...). Either way the matcher is then unusable."""
        self._only_eos = False
        self.consumed += 1
        start = time.thread_time()
        ok = self._m.consume_token(token_id)
        self._consume_s = time.thread_time() - start
        if ok:
            return
        reason = self._reason()
        if "doesn't satisfy the grammar" in reason:
            raise SamplingError(f"the grammar rejects token {token_id}: {reason}"[:500])
        raise self._failure(f"at output token {self.consumed}", reason)

    def replay(self, token_ids: Sequence[int]) -> None:
        """Consume tokens generated elsewhere (a resumed request's tokens so far)."""
        for token in token_ids:
            self.consume(token)

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state (a forked choice of n > 1)."""
        return GrammarMatcher(self._m.deep_copy(), self.vocab_size, self.eos_id, self.field,
                              self.consumed)

    @property
    def finished(self) -> bool:
        """The grammar can take nothing but EOS (stopped, or its last mask allowed only EOS):
        the sequence ends here ("stop"), before sampling if need be."""
        return (self._m.is_stopped() or self._only_eos) and not self._m.is_error()

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` ((R, W) int32, bit t % 32 of word
        t // 32 set if token t is allowed; EOS exactly when the grammar accepts).
        InvalidRequest naming the field if llguidance fails (its limits). `last_ms`: this
        token's grammar work (consuming the last token, then this fill), which fill_masks
        bounds by MAX_MASK_MS."""
        start = time.thread_time()
        llg_numpy.fill_next_token_bitmask(self._m, bitmask, row)
        ms = (time.thread_time() - start + self._consume_s) * 1e3
        self._consume_s = 0.0
        if self._m.is_error():
            raise self._failure(f"at output token {self.consumed + 1}", self._reason())
        self.last_ms = ms
        words = bitmask[row].view(np.uint32)                              # (W,)
        self._only_eos = (words[self.eos_id // 32] == 1 << self.eos_id % 32
                          and np.count_nonzero(words) == 1)

    def _reason(self) -> str:
        return _error_of(self._m)[:300]

    def _failure(self, where: str, reason: str) -> InvalidRequest:
        """The request's error when llguidance fails mid-generation: a grammar over its limits,
        or one that reached a dead end (NoExtensionBias: a branch whose language is empty, such
        as a recursive $ref behind a prefix, which llguidance cannot see ahead of time)."""
        why = ("it reached a part that matches no text (a dead end, e.g. a recursive $ref)"
               if "NoExtensionBias" in reason else "it exceeded its limits")
        return InvalidRequest(f"{self.field}: the grammar failed {where}: {why}: {reason}")


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A compiled constraint, immutable and shared by every request with the same content."""
    grammar: str                    # llguidance's grammar text (JSON)
    strip_leading_space: bool       # the completion text drops its one leading space
    _start: llg.LLMatcher = dataclasses.field(repr=False)   # copied for each sequence
    vocab_size: int = 0
    eos_id: int = 0

    def matcher(self, field: str = "constraint") -> GrammarMatcher:
        """A fresh matcher at the grammar's start (a copy: microseconds, no compile); its
        failures name `field` (the request's constraint field)."""
        return GrammarMatcher(self._start.deep_copy(), self.vocab_size, self.eos_id, field)


class GrammarCompiler:
    """Compiles constraints for one tokenizer on one worker thread, cached by content."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256):
        self._tokenizer_json = tokenizer.backend_json
        self._vocab_size, self._eos = tokenizer.vocab_size, tokenizer.eos_id
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[Constraint, concurrent.futures.Future] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._lltok: llg.LLTokenizer | None = None          # built on the worker thread
        self._space: list[int] = []                          # a token of exactly b" "

    def compile(self, c: Constraint) -> concurrent.futures.Future[CompiledGrammar]:
        """A future of `c`'s grammar; never blocks. It raises InvalidRequest naming c.field with
        llguidance's reason if the grammar does not compile or is over LIMITS. The same
        content gives the same CompiledGrammar object while it is cached."""
        with self._lock:
            inner = self._cache.get(c)
            if inner is None:
                inner = self._cache[c] = self._pool.submit(self._compile, c)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(c)
        return _naming(inner, c.field)

    def _compile(self, c: Constraint) -> CompiledGrammar:
        """On the worker: the grammar, wrapped with an optional leading space if it cannot
        start with one itself. GrammarError with llguidance's reason."""
        self._tokenizer()
        grammar = grammar_text(c)
        start = self._matcher(grammar)
        _check_start(start)
        if start.validate_tokens(self._space) == 1:          # it may start with a space itself
            return CompiledGrammar(grammar, False, start, self._vocab_size, self._eos)
        wrapped = with_leading_space(grammar)
        return CompiledGrammar(wrapped, True, self._matcher(wrapped), self._vocab_size,
                               self._eos)

    def _matcher(self, grammar: str) -> llg.LLMatcher:
        limits = llg.LLParserLimits(**LIMITS)
        error = llg.LLMatcher.validate_grammar(grammar, self._lltok, limits=limits)
        if error:
            raise GrammarError(" ".join(error.split()))      # one line, for a reply
        matcher = llg.LLMatcher(self._lltok, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise GrammarError(" ".join(matcher.get_error().split()))
        return matcher

    def _tokenizer(self) -> llg.LLTokenizer:
        """llguidance's view of the tokenizer (~0.1 s to build, once, on the worker)."""
        if self._lltok is None:
            self._lltok = llg.LLTokenizer(self._tokenizer_json, n_vocab=self._vocab_size,
                                          eos_token=self._eos)
            self._space = self._lltok.greedy_tokenize(" ")[:1]
        return self._lltok


def _error_of(matcher: llg.LLMatcher) -> str:
    """llguidance's error, on one line, without its non-verbose marker."""
    return " ".join(matcher.get_error().replace("<non-verbose/>", "").split())


def _check_start(start: llg.LLMatcher) -> None:
    """GrammarError if the grammar fails at its start: its language is empty (no token is
    allowed and it does not accept: `start: start`, a `$ref` cycle) or its first mask is over
    the limits."""
    start.compute_bitmask()
    if not start.is_error():
        return
    reason = _error_of(start)
    if "NoExtensionBias" in reason:
        raise GrammarError("the grammar matches no text (its language is empty)")
    raise GrammarError(f"the grammar exceeded its limits before its first token: {reason}")


def _naming(inner: concurrent.futures.Future, field: str) -> concurrent.futures.Future:
    """A future of `inner`'s result whose GrammarError becomes InvalidRequest naming `field`
    (done at once when `inner` is)."""
    outer: concurrent.futures.Future = concurrent.futures.Future()

    def done(f: concurrent.futures.Future) -> None:
        error = f.exception()
        if error is None:
            outer.set_result(f.result())
        elif isinstance(error, GrammarError):
            outer.set_exception(InvalidRequest(f"{field}: {error}"))
        else:
            outer.set_exception(error)
    inner.add_done_callback(done)
    return outer


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer) -> GrammarCompiler:
    """The process-wide compiler of a tokenizer (its cache shared by engines and gateways)."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GrammarCompiler(tokenizer)
        return compiler


def check_constraint(tokenizer: Tokenizer, c: Constraint) -> None:
    """Compile `c` (or find it cached), blocking; InvalidRequest naming c.field if it does
    not compile. Gateways call it (in a thread) before a request reaches the engine."""
    compiler_for(tokenizer).compile(c).result()


def check_mask_time(field: str, ms: float, choices: int = 1) -> None:
    """InvalidRequest naming `field` if one token's grammar work took over MAX_MASK_MS (`ms`
    of CPU time: one row's, or the sum over a request's `choices` rows in one step)."""
    if ms > MAX_MASK_MS:
        rows = "" if choices == 1 else f" for its {choices} choices"
        raise InvalidRequest(f"{field}: the grammar took {ms:.1f} ms to compute one token's "
                             f"mask{rows}; the limit is {MAX_MASK_MS:g} ms: too ambiguous or "
                             "too large")


def fill_masks(matchers: Sequence[GrammarMatcher], vocab_size: int,
               device: str | torch.device, errors: dict[int, InvalidRequest] | None = None,
               requests: Sequence[str] | None = None) -> torch.Tensor:
    """(R, V) bool of each matcher's allowed next tokens: llguidance fills one (R, W) int32
    bitmask (a call per row, microseconds each), unpacked for all rows at once. Tokens past
    the tokenizer's vocabulary (a model padded beyond it) are never allowed. A row whose
    grammar fails (InvalidRequest: its limits, MAX_MASK_MS) is raised, or with `errors` put
    there by row and left all False. `requests` (each row's request id): a request's rows
    (its n choices) are bounded by MAX_MASK_MS together, so n cannot multiply the bound."""
    words = -(-matchers[0].vocab_size // 32)
    bitmask = np.zeros((len(matchers), words), dtype=np.int32)           # (R, W)
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for row, matcher in enumerate(matchers):
        try:
            matcher.fill(bitmask, row)
            groups[requests[row] if requests is not None else str(row)].append(row)
        except InvalidRequest as e:
            if errors is None:
                raise
            errors[row] = e
    for rows in groups.values():
        try:
            check_mask_time(matchers[rows[0]].field, sum(matchers[r].last_ms for r in rows),
                            len(rows))
        except InvalidRequest as e:
            if errors is None:
                raise
            errors.update(dict.fromkeys(rows, e))
    for row in errors or ():
        bitmask[row] = 0
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")   # (R, 32 W)
    if bits.shape[1] < vocab_size:
        bits = np.pad(bits, ((0, 0), (0, vocab_size - bits.shape[1])))
    return torch.from_numpy(bits[:, :vocab_size]).to(device=device, dtype=torch.bool)
