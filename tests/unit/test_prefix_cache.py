"""The prefix cache's block bookkeeping (model/prefix_cache.py) and the scheduler's use of it.

Two property tests (hypothesis): the allocator against a plain reference model (reference
counts, free and evictable lists, LRU eviction of unreferenced blocks only); and the scheduler
over random admit / grow / finish / preempt sequences on a tiny cache, where each KV slot holds
what a model would write there (the tokens up to its position): every block's content equals a
recompute's, and every block's reference count equals its holders. Neither ran before prefix
caching (model.prefix_cache did not exist; no block was ever reused across requests).
"""
from __future__ import annotations

import collections
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from model.errors import InvalidRequest
from model.prefix_cache import BlockAllocator, block_hash, extend_hashes
from model.sampling import SamplingParams
from model.scheduler import Request, Scheduler

SALT = b"salt"


# ---- hashing --------------------------------------------------------------------------------
def test_a_block_hash_names_its_tokens_and_everything_before_them():
    a = extend_hashes([], SALT, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2                                      # full blocks only
    assert a == extend_hashes(a[:1], SALT, [1, 2, 3, 4, 5, 6, 7, 8], 4)    # incremental
    assert a[1] == block_hash(a[0], [5, 6, 7, 8])
    b = extend_hashes([], SALT, [1, 2, 3, 0, 5, 6, 7, 8], 4)
    assert b[1] != a[1]                 # same block tokens, another parent: another content
    assert extend_hashes([], b"other weights", [1, 2, 3, 4], 4)[0] != a[0]


# ---- the allocator against a reference model -------------------------------------------------
class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / share / free / cache / take / uncache; the model is the policy
    written plainly: a free stack, an LRU list of released cached blocks, hash <-> block
    maps."""
    N = 6

    def __init__(self):
        super().__init__()
        self.alloc = BlockAllocator(self.N)
        self.refs = [0] * self.N
        self.free = list(range(self.N))              # in the order allocate hands them out
        self.lru: list[int] = []                     # evictable, next to evict first
        self.hash_of: dict[int, bytes] = {}
        self.holds: list[int] = []                   # one entry per holder

    def _held(self) -> list[int]:
        return sorted(set(self.holds))

    @rule(n=st.integers(1, 3))
    def allocate(self, n):
        if n > len(self.free) + len(self.lru):
            with pytest.raises(RuntimeError):
                self.alloc.allocate(n)
            return
        got = self.alloc.allocate(n)
        expected = self.free[:n]
        self.free = self.free[len(expected):]
        evicted, self.lru = self.lru[:n - len(expected)], self.lru[n - len(expected):]
        for b in evicted:
            assert self.refs[b] == 0                 # only unreferenced blocks are evicted
            del self.hash_of[b]
        assert got == expected + evicted             # never-cached first, then LRU order
        for b in got:
            self.refs[b] = 1
        self.holds += got

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def share(self, data):
        b = data.draw(st.sampled_from(self._held()))
        self.alloc.share([b])
        self.refs[b] += 1
        self.holds.append(b)

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def free_blocks(self, data):
        blocks = data.draw(st.lists(st.sampled_from(self._held()), min_size=1, max_size=3,
                                    unique=True))
        self.alloc.free(blocks)
        released = []
        for b in blocks:
            self.holds.remove(b)
            self.refs[b] -= 1
            if self.refs[b] == 0:
                released.append(b)
        for b in reversed(released):                 # a table's last block evicted first
            if b in self.hash_of:
                self.lru.append(b)
            else:
                self.free.insert(0, b)               # handed out next

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), content=st.integers(0, 4))
    def cache(self, data, content):
        b = data.draw(st.sampled_from(self._held()))
        h = bytes([content])
        self.alloc.cache(b, h)
        if b not in self.hash_of and h not in self.hash_of.values():
            self.hash_of[b] = h

    @precondition(lambda self: self.hash_of)
    @rule(data=st.data())
    def take(self, data):
        h = data.draw(st.sampled_from(sorted(self.hash_of.values())))
        [b] = self.alloc.cached_prefix([h])
        assert self.hash_of[b] == h
        self.alloc.take([b])
        if self.refs[b] == 0:
            self.lru.remove(b)
        self.refs[b] += 1
        self.holds.append(b)

    @precondition(lambda self: self.hash_of)
    @rule(data=st.data())
    def uncache(self, data):
        b = data.draw(st.sampled_from(sorted(self.hash_of)))
        self.alloc.uncache(b)
        del self.hash_of[b]
        if b in self.lru:                            # evictable: plainly free, handed out next
            self.lru.remove(b)
            self.free.insert(0, b)

    @invariant()
    def agrees_with_the_model(self):
        a = self.alloc
        assert [a.refcount(b) for b in range(self.N)] == self.refs
        assert collections.Counter(self.holds) == {b: r for b, r in enumerate(self.refs) if r}
        assert a.evictable() == self.lru
        assert a.num_free == len(self.free) + len(self.lru)
        assert a.num_cached == len(self.hash_of)
        # no block both free and referenced; each block is free, evictable or held
        assert all(self.refs[b] == 0 for b in self.free + self.lru)
        assert len(self.free) + len(self.lru) + sum(r > 0 for r in self.refs) == self.N


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None, derandomize=True)
test_the_allocator_follows_its_reference_model = AllocatorMachine.TestCase


def test_allocator_errors_name_the_block():
    alloc = BlockAllocator(2)
    [b] = alloc.allocate(1)
    alloc.free([b])
    with pytest.raises(RuntimeError, match="already free"):
        alloc.free([b])
    with pytest.raises(RuntimeError, match="cannot be cached"):
        alloc.cache(b, b"h")
    with pytest.raises(RuntimeError, match="not cached"):
        alloc.take([b])
    with pytest.raises(RuntimeError, match="asked for 3 KV blocks, 2 free"):
        alloc.allocate(3)


# ---- the scheduler over a simulated KV cache -------------------------------------------------
@dataclasses.dataclass
class Simulation:
    """A scheduler on a cache of `num_blocks` blocks of 2 tokens, and what each slot holds:
    the tokens up to its position (all a position's keys and values depend on)."""
    num_blocks: int
    block: int = 2

    def __post_init__(self):
        self.alloc = BlockAllocator(self.num_blocks)
        self.sched = Scheduler(self.alloc, self.block, max_num_seqs=4, max_num_batched_tokens=5,
                               cache_salt=SALT)
        self.slots: dict[int, tuple] = {}            # slot -> the tokens its keys stand for
        self.reqs: list[Request] = []

    def step(self, next_token: int) -> None:
        scheduled = self.sched.schedule()
        for src, dst in self.sched.take_copies():    # the engine's copy-on-write
            for i in range(self.block):
                if src * self.block + i in self.slots:
                    self.slots[dst * self.block + i] = self.slots[src * self.block + i]
        for req, n in scheduled:
            ids = req.all_ids
            for p in range(req.num_computed, req.num_computed + n):
                self.slots[req.block_table[p // self.block] * self.block + p % self.block] = \
                    tuple(ids[:p + 1])
            req.num_computed += n
            if req.num_computed == req.num_tokens:
                req.output_ids.append(next_token)    # a decoded token, to compute next step

    def check(self) -> None:
        holders = collections.Counter(b for r in self.sched.running for b in r.block_table)
        assert all(not r.block_table for r in self.sched.waiting)
        for b in range(self.num_blocks):
            assert self.alloc.refcount(b) == holders[b]          # counts equal holders
        assert self.alloc.num_free + len(holders) == self.num_blocks
        for r in self.sched.running:                 # computed content equals a recompute's
            ids = r.all_ids
            for p in range(r.num_computed):
                assert self.slots[r.block_table[p // self.block] * self.block
                                  + p % self.block] == tuple(ids[:p + 1])
        for block, h in self.alloc._hash_of.items():  # a cached block holds what it is named
            content = tuple(self.slots[block * self.block + i] for i in range(self.block))
            tokens = content[-1]
            assert extend_hashes([], SALT, tokens, self.block)[-1] == h
            assert content == tuple(tokens[:i + 1] for i in range(len(tokens) - self.block,
                                                                   len(tokens)))


PREFIXES = [[1, 5, 6, 7, 8], [1, 5, 6, 9], [1, 2]]


@settings(max_examples=120, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "step", "finish"]),
                          st.integers(0, 2), st.lists(st.integers(10, 12), max_size=3),
                          st.integers(1, 6)), max_size=40),
       st.integers(5, 9))
def test_scheduled_blocks_hold_what_a_recompute_would_and_counts_equal_holders(ops, blocks):
    sim = Simulation(blocks)
    for op, which, suffix, max_tokens in ops:
        if op == "add" and len(sim.reqs) < 6:
            req = Request(str(len(sim.reqs)), PREFIXES[which] + suffix,
                          SamplingParams(max_tokens=max_tokens))
            sim.reqs.append(req)
            sim.sched.add(req)
        elif op == "finish" and sim.sched.running:
            sim.sched.finish(sim.sched.running[which % len(sim.sched.running)])
        elif op == "step":
            sim.step(next_token=20 + which)
            for r in list(sim.sched.running):        # a request ends at its 4th token
                if len(r.output_ids) >= 4 and r.num_computed == r.num_tokens - 1:
                    sim.sched.finish(r)
        sim.check()
    hits = sum(r.num_cached_tokens or 0 for r in sim.reqs)
    assert sim.sched.prefix_cache.hits == hits
    assert sim.sched.prefix_cache.queries >= hits


def test_a_request_takes_the_cached_chain_but_computes_its_last_token():
    sim = Simulation(num_blocks=8)
    first = Request("a", [1, 5, 6, 7, 8, 9], SamplingParams(max_tokens=1))
    sim.sched.add(first)
    sim.step(next_token=20)
    sim.step(next_token=20)
    cached = first.block_table[:3]
    sim.sched.finish(first)
    assert sim.alloc.evictable() == cached[::-1]        # its last block is evicted first
    again = Request("b", [1, 5, 6, 7, 8, 9], SamplingParams(max_tokens=1))
    longer = Request("c", [1, 5, 6, 7, 8, 9, 30], SamplingParams(max_tokens=1))
    logprobs = Request("d", [1, 5, 6, 7, 8, 9], SamplingParams(max_tokens=1, prompt_logprobs=0))
    for req in (again, longer, logprobs):
        sim.sched.add(req)
    assert [(r.request_id, n) for r, n in sim.sched.schedule()] == [("b", 2), ("c", 1), ("d", 2)]
    # 6 tokens: 2 full blocks of the 3 taken (the last token computed); 7 tokens: all 3;
    # prompt logprobs never read the cache
    assert [r.num_cached_tokens for r in (again, longer, logprobs)] == [4, 6, 0]
    assert again.block_table[:2] == cached[:2] and longer.block_table[:3] == cached
    assert sim.sched.prefix_cache.queries == 6 + 6 + 7 and sim.sched.prefix_cache.hits == 10


def test_only_requests_with_the_same_cache_salt_share_blocks():
    """vLLM's `cache_salt`: a tenant's blocks are invisible to requests without its salt."""
    sim = Simulation(num_blocks=16)
    prompt = [1, 5, 6, 7, 8, 9]

    def run(salt):
        req = Request(salt or "-", prompt, SamplingParams(max_tokens=1, cache_salt=salt))
        sim.sched.add(req)
        sim.step(next_token=20)
        sim.step(next_token=20)
        sim.sched.finish(req)
        return req.num_cached_tokens

    assert [run(s) for s in ("a", "a", "b", None, "b", None)] == [0, 4, 0, 0, 4, 4]


@pytest.mark.parametrize("salt, got", [("", "0 characters"), ("secret" * 200, "1200 characters"),
                                       (7, "int")])
def test_a_bad_cache_salt_names_the_field_and_never_quotes_it(salt, got):
    """The salt is a tenant's secret: the refusal (a 400 body, a log line) says its length or
    type, never its text."""
    with pytest.raises(InvalidRequest, match="cache_salt must be a non-empty string of at most "
                                             f"1024 characters or None, got {got}$"):
        SamplingParams(cache_salt=salt)


def test_a_cache_salt_that_is_not_unicode_is_refused_at_admission():
    """A lone surrogate (JSON can spell one) cannot be hashed as UTF-8: refused naming the
    field, before the scheduler's step would raise on it and fail every request of the step."""
    with pytest.raises(InvalidRequest, match=r"cache_salt: holds a lone surrogate \(U\+D800"):
        SamplingParams(cache_salt="tenant\ud800")
