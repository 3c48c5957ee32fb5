"""Continuous batching: which tokens of which requests run in the next step.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running requests go first, oldest first: one token each when decoding, or the next chunk of
their prompt when still prefilling. Waiting requests are then admitted first-come first-served
while budget, sequence slots and KV blocks allow; a long prompt is prefilled in chunks over
several steps. When a running request needs a KV block and none is free, the newest running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its prompt plus the tokens it already generated.
A request with n > 1 choices is one sequence until its prompt is computed, then `fork`s into n
that share the prompt's blocks (reference counts, model/prefix_cache.py: BlockAllocator); a
sequence only writes to blocks it alone holds: before computing into a shared block it takes a
copy (copy-on-write; the engine copies the KV content, `take_copies`). So one sequence's
shortage or preemption never corrupts another. The scheduler knows nothing about tensors.
Prefix caching (model/prefix_cache.py; on when the scheduler has a `cache_salt`): a block is
cached by its content's hash as soon as the step that fills it is scheduled, as vLLM's
`allocate_slots` does: a request admitted later in the same step may take it already, since
each layer writes the whole step's keys before any of its attention reads them
(model/mixtral.py; with two micro-batches, the first's before the second's), and the taker
comes later in the step's order; if the step fails, `discard_step` forgets them. A waiting
request is admitted holding the longest chain of cached full blocks of its tokens, at most
(num_tokens - 1) // block_size of them (its last token is always computed: its logits are
needed; so it never writes into a cached block), and prefills only the rest. A preempted
request finds its own blocks again unless they were evicted meanwhile. A request asking for
prompt logprobs, or a logits request, computes every position (it never reads the cache).
A request with a `cache_salt` shares blocks only with requests that have the same one.

Example (budget 8, block_size 4): running A decoding, waiting B with a 10-token prompt ->
step 1 schedules [(A, 1), (B, 7)], step 2 [(A, 1), (B, 3)], then B decodes too.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import TYPE_CHECKING

from model.prefix_cache import BlockAllocator, PrefixCacheStats, extend_hashes, salted
from model.sampling import SamplingParams, SequenceState

if TYPE_CHECKING:
    from model.grammar import GrammarMatcher

_arrivals = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams | None               # None: a logits request (no sampling)
    seed: int | None = None                     # sampling.request_seed; None: greedy
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0                       # tokens whose keys are in the KV cache
    finish_reason: str | None = None
    arrival: int = dataclasses.field(default_factory=lambda: next(_arrivals))
    index: int = 0                              # the choice, of params.n
    num_forks: int = 0                          # choices still to fork from it (n - 1 at first)
    top_logprobs: list = dataclasses.field(default_factory=list)   # per output token, if asked
    # the sampler's per-sequence state (penalty counts); the scheduler never reads it
    sampling_state: SequenceState = dataclasses.field(default_factory=SequenceState)
    # its place in its structured-output grammar (model/grammar.py), or None; a forked choice
    # gets its own copy (the engine's); the scheduler never reads it
    matcher: GrammarMatcher | None = None
    # content hashes of its full blocks (model/prefix_cache.py), extended as tokens come
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    # tokens whose KV it took from the prefix cache when first admitted; None until then
    num_cached_tokens: int | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, cache_salt: bytes | None = None):
        """`cache_salt`: the first block's parent hash (model/prefix_cache.py: weights_salt);
        None turns prefix caching off."""
        self.allocator = allocator
        self.cache_salt = cache_salt
        self.prefix_cache = PrefixCacheStats()
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._copies: list[tuple[int, int]] = []       # (source, destination) blocks to copy
        self._fresh: list[int] = []                     # blocks cached for the step scheduled

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Request, int]]:
        """Return (request, number of its next tokens to compute) for the next step."""
        self._fresh = []
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False
        for req in list(self.running):
            if req not in self.running or budget == 0:
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._reserve(req, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                self._cache_filled(req, n)
                budget -= n
        while (self.waiting and not preempted and budget > 0
               and self.num_seqs() + 1 + self.waiting[0].num_forks <= self.max_num_seqs):
            req = self.waiting[0]
            n = self._admit(req, budget)
            if not n:
                break
            self.waiting.popleft()
            self.running.append(req)
            self.running.sort(key=lambda r: r.arrival)
            scheduled.append((req, n))
            self._cache_filled(req, n)
            budget -= n
        return scheduled

    def num_seqs(self) -> int:
        """Sequences running, counting the choices still to fork from a running prompt."""
        return sum(1 + r.num_forks for r in self.running)

    def fork(self, req: Request, seeds: list[int | None]) -> list[Request]:
        """Fork a running request whose prompt is computed into its n choices: `req` is choice
        0, and the returned n - 1 new sequences (choices 1.., seeded `seeds`) share its blocks
        and run right after it."""
        children = [dataclasses.replace(
            req, seed=seed, index=i, num_forks=0, output_ids=list(req.output_ids),
            logprobs=list(req.logprobs), top_logprobs=list(req.top_logprobs),
            block_table=list(req.block_table), block_hashes=list(req.block_hashes),
            sampling_state=SequenceState())
            for i, seed in enumerate(seeds, start=1)]
        req.num_forks = 0
        for child in children:
            self.allocator.share(child.block_table)
        at = self.running.index(req) + 1
        self.running[at:at] = children
        return children

    def discard_step(self) -> None:
        """The step just scheduled failed: forget the blocks it was to fill (their content is
        not what their names say)."""
        for block in self._fresh:
            self.allocator.uncache(block)
        self._fresh = []

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) KV blocks to copy before the step just scheduled runs."""
        copies, self._copies = self._copies, []
        return copies

    def finish(self, req: Request) -> None:
        """Release a finished or aborted request's blocks, wherever it is."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.allocator.free(req.block_table)
        req.block_table = []

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _admit(self, req: Request, budget: int) -> int:
        """Reserve a waiting request's blocks for its next `budget` tokens at most, first
        taking the longest chain of cached blocks of its tokens; return how many tokens it
        computes in this step, or 0, changing nothing, if too few blocks are free. Its first
        admission counts in `prefix_cache`."""
        cached = self._cached_prefix(req)
        computed = len(cached) * self.block_size
        n = min(req.num_tokens - computed, budget)
        revived = sum(self.allocator.refcount(b) == 0 for b in cached)  # evictable, now held
        if self.blocks_needed(computed + n) - len(cached) > self.allocator.num_free - revived:
            return 0
        self.allocator.take(cached)
        req.block_table, req.num_computed = cached, computed
        if not self._reserve(req, computed + n):
            raise RuntimeError("KV blocks counted free were not")     # a bug: checked above
        if req.num_cached_tokens is None:
            req.num_cached_tokens = computed
            if self.cache_salt is not None and _reads_cache(req):
                self.prefix_cache.queries += req.num_tokens
                self.prefix_cache.hits += computed
        return n

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks a waiting request can take: the longest cached chain of its full
        blocks, its last token left to compute; none if caching is off or it never reads."""
        if self.cache_salt is None or not _reads_cache(req):
            return []
        limit = (req.num_tokens - 1) // self.block_size
        return self.allocator.cached_prefix(self._hashes(req)[:limit])

    def _cache_filled(self, req: Request, n: int) -> None:
        """Name the blocks that computing `n` more tokens of `req` fills (prefix caching on)."""
        first = req.num_computed // self.block_size
        full = (req.num_computed + n) // self.block_size
        if self.cache_salt is None or full == first:
            return
        hashes = self._hashes(req)
        for i in range(first, full):
            if self.allocator.cache(req.block_table[i], hashes[i]):
                self._fresh.append(req.block_table[i])

    def _hashes(self, req: Request) -> list[bytes]:
        """The content hashes of every full block of the request's tokens, its chain extended
        from what it holds already. The first block's parent is the engine's salt, mixed with
        the request's `cache_salt` if it has one (only requests with the same one share)."""
        own = req.params.cache_salt if req.params is not None else None
        salt = self.cache_salt if own is None else salted(self.cache_salt, own)
        return extend_hashes(req.block_hashes, salt, req.all_ids, self.block_size)

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Blocks for the request's tokens up to `num_tokens`, and a copy of each shared block
        it will write into (copy-on-write); False, changing nothing, if too few are free."""
        table, alloc = req.block_table, self.allocator
        needed = self.blocks_needed(num_tokens)
        shared = [i for i in range(req.num_computed // self.block_size, min(needed, len(table)))
                  if alloc.refcount(table[i]) > 1]
        missing = max(needed - len(table), 0)
        if missing + len(shared) > alloc.num_free:
            return False
        for i in shared:
            [copy] = alloc.allocate(1)
            self._copies.append((table[i], copy))
            alloc.free([table[i]])
            table[i] = copy
        if missing > 0:
            table += alloc.allocate(missing)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.free(req.block_table)
        req.block_table = []
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.num_preemptions += 1


def _reads_cache(req: Request) -> bool:
    """Whether a request may take cached blocks: not when it needs every prompt position's
    logits (a logits request, or one asking for prompt logprobs)."""
    return req.params is not None and req.params.prompt_logprobs is None
