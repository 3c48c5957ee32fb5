"""Prefix caching's blocks (issue 23), seen from the engine: every cached block holds what a
recompute writes, eviction takes the least recently released blocks, and random requests
sharing random prefixes equal the uncached oracle, each reporting the reference's cached
tokens (tests/prefix.py). The allocator alone: tests/unit/test_prefix_cache.py."""
from __future__ import annotations

import array
import dataclasses
import itertools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.engine import Engine, SamplingParams
from model.prefix_cache import PrefixCacheStats, extend_hashes
from tests.prefix import BS, assert_same, computed, expected_cached, fresh, stats_since


def _recomputed_kv(uncached: Engine, tokens: list[int]) -> tuple[list, list]:
    """Per layer, (blocks, BS, K, Dh) keys and values of `tokens` computed by the oracle in one
    prefill, read from its running request's block table."""
    request_id = uncached.add_request(tokens, SamplingParams(max_tokens=2, temperature=0.0))
    uncached.step()                                      # the whole prompt in one step
    [req] = uncached.scheduler.running
    table = req.block_table[:len(tokens) // BS]
    kv = [k[table] for k in uncached.kv.k], [v[table] for v in uncached.kv.v]
    uncached.abort(request_id)
    return kv


def test_every_cached_block_holds_what_a_recompute_writes(prefix_engine, uncached):
    """After a mixed workload in a cache small enough that blocks are evicted and reused
    (chunked prefill, batches sharing prefixes), each block the cache names for a sequence
    holds the keys and values the oracle computes for it: none was written into after it was
    cached, nor named by another block's content."""
    engine = prefix_engine(blocks=40, max_model_len=64, max_num_batched_tokens=7)
    rng = random.Random(6)
    bases, seqs = [fresh(rng, 14) for _ in range(3)], []
    for _ in range(3):
        prompts = [base[:rng.choice([0, 4, 8, 14])] + fresh(rng, rng.randint(1, 9))
                   for base in bases for _ in range(2)]
        params = [SamplingParams(max_tokens=rng.randint(1, 10), temperature=1.0, seed=i)
                  for i in range(len(prompts))]
        seqs += [computed(out) for out in engine.generate(prompts, params)]
    salt = engine.scheduler.cache_salt
    chains = [(seq, engine.kv.allocator.cached_prefix(extend_hashes([], salt, seq, BS)))
              for seq in seqs]
    assert any(len(blocks) < len(seq) // BS for seq, blocks in chains)      # evicted
    assert sum(map(len, (blocks for _, blocks in chains))) >= 10
    for seq, blocks in chains:
        if blocks:
            want_k, want_v = _recomputed_kv(uncached, seq[:len(blocks) * BS])
            for layer, (k, v) in enumerate(zip(want_k, want_v)):
                assert torch.allclose(engine.kv.k[layer][blocks], k, rtol=1e-5, atol=1e-6)
                assert torch.allclose(engine.kv.v[layer][blocks], v, rtol=1e-5, atol=1e-6)
    assert uncached.num_tracked() == 0


def test_the_least_recently_released_blocks_are_evicted_first_a_chain_from_its_end(prefix_engine):
    """16 blocks: A, then B, cache 4 blocks each; C needs 11, the 8 never used and 3 evicted:
    A's (released before B's), from the end of its chain, so A keeps its first block."""
    engine, rng = prefix_engine(blocks=16, max_model_len=64), random.Random(7)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    a, b = fresh(rng, 16), fresh(rng, 16)
    for prompt in (a, b, fresh(rng, 41)):
        engine.generate(prompt, one)
    salt = engine.scheduler.cache_salt
    chains = [engine.kv.allocator.cached_prefix(extend_hashes([], salt, p, BS)) for p in (a, b)]
    assert list(map(len, chains)) == [1, 4]
    assert [engine.generate(p + [5], one)[0].cached_tokens for p in (b, a)] == [16, 4]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_requests_admitted_in_one_step_share_the_blocks_it_fills(prefix_engine, uncached,
                                                                  micro_batches):
    """Cold start, all at once: the first request's prompt blocks are named when its step is
    scheduled, so the others admitted in that step take them (each layer writes the step's keys
    before its attention reads them; the takers come later in the step, in the same micro-batch
    or the next). Before, only requests of later steps hit: all but one recomputed them."""
    engine, rng = prefix_engine(micro_batches=micro_batches), random.Random(11)
    shared = fresh(rng, 6 * BS)
    prompts = [shared + fresh(rng, 3) for _ in range(4)]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    got = engine.generate(prompts, params)
    assert [c.cached_tokens for c in got] == [0] + [6 * BS] * 3
    for g, want in zip(got, uncached.generate(prompts, params)):
        assert_same(g, want)


def test_a_failed_step_forgets_the_blocks_it_was_to_fill(prefix_engine, uncached):
    """A forward that fails half-way leaves blocks named but not written: they are forgotten,
    so the same prompt afterwards is computed again (cached 0) and equals the oracle."""
    engine, rng = prefix_engine(), random.Random(12)
    prompt, params = fresh(rng, 5 * BS), SamplingParams(max_tokens=3, temperature=0.0)
    moe, calls = engine.moe, []

    def flaky(layer, *args):
        calls.append(layer)
        if len(calls) == 2:                       # layer 1 of the first step
            raise RuntimeError("expert exploded")
        return moe(layer, *args)

    engine.moe = flaky
    with pytest.raises(RuntimeError, match="expert exploded"):
        engine.generate(prompt, params)
    engine.moe = moe
    assert engine.kv.allocator.num_cached == 0
    [again] = engine.generate(prompt, params)
    assert again.cached_tokens == 0
    assert_same(again, uncached.generate(prompt, params)[0])


def test_no_cache_salt_joins_the_unsalted_chain(prefix_engine, uncached):
    """A salt whose UTF-8 bytes spell a block's int64 token ids once made the salted chain's
    first parent equal that block's unsalted hash: the attacker's block T1 (computed at
    positions 0..) was then named as block 2 of T0 + T1, and an unsalted victim sending
    T0 + T1 took its wrong keys (found by a breaker; the hash inputs are now tagged apart)."""
    engine, rng = prefix_engine(), random.Random(13)
    t0 = [1] + [rng.randrange(3, 128) for _ in range(BS - 1)]    # ids < 128: ASCII bytes
    t1 = fresh(rng, BS)
    salt = array.array("q", t0).tobytes().decode("utf-8")
    params = SamplingParams(max_tokens=4, temperature=0.0)
    engine.generate(t0 + [5], params)                          # T0 cached, unsalted
    engine.generate(t1 + fresh(rng, 2), dataclasses.replace(params, cache_salt=salt))
    victim = t0 + t1 + fresh(rng, 3)
    [got] = engine.generate(victim, params)
    assert got.cached_tokens == BS                             # T0 only
    assert_same(got, uncached.generate(victim, params)[0])


_EXAMPLES = itertools.count(3)       # each example's prompts start with its own token


@st.composite
def request_sets(draw) -> list[tuple[list[int], SamplingParams]]:
    """2-5 requests, each prompt the first `share` tokens of an earlier one (or only the
    example's first token) and 1-9 fresh tokens; greedy or seeded, 1-5 tokens each, some with
    a `cache_salt` (only requests with the same one share blocks)."""
    rng, first = random.Random(draw(st.integers(0, 2**32))), next(_EXAMPLES)
    prompts, requests = [], []
    for i in range(draw(st.integers(2, 5))):
        parent = draw(st.none() | st.integers(0, i - 1)) if i else None
        head = [first] if parent is None else prompts[parent][:max(1, draw(st.integers(0, 30)))]
        prompts.append(head + fresh(rng, draw(st.integers(1, 9))))
        seed = draw(st.none() | st.integers(0, 2**31))
        requests.append((prompts[-1], SamplingParams(
            max_tokens=draw(st.integers(1, 5)), temperature=0.0 if seed is None else 1.0,
            seed=seed, ignore_eos=True, cache_salt=draw(st.sampled_from([None, "a", "b"])))))
    return requests


@pytest.fixture(scope="module")
def one_by_one(prefix_engine) -> Engine:
    return prefix_engine(blocks=8192)


@pytest.fixture(scope="module")
def chunked(prefix_engine) -> Engine:
    return prefix_engine(blocks=8192, max_num_batched_tokens=6)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=request_sets())
def test_random_requests_sharing_random_prefixes_equal_outputs_without(uncached, one_by_one,
                                                                       chunked, requests):
    """One by one, each reports exactly the reference's cached tokens; all at once under
    chunked prefill (later ones admitted once earlier ones' blocks are cached), each equals the
    oracle too, and the counts add up."""
    oracle = [uncached.generate(prompt, params)[0] for prompt, params in requests]
    earlier: dict[str | None, list[list[int]]] = {None: [], "a": [], "b": []}   # by cache_salt
    for (prompt, params), want in zip(requests, oracle):
        [got] = one_by_one.generate(prompt, params)
        assert got.cached_tokens == expected_cached(prompt, earlier[params.cache_salt])
        assert_same(got, want)
        earlier[params.cache_salt].append(computed(got))
    before = dataclasses.replace(chunked.scheduler.prefix_cache)
    outs = chunked.generate([p for p, _ in requests], [params for _, params in requests])
    for (prompt, _), got, want in zip(requests, outs, oracle):
        assert_same(got, want)
        assert got.cached_tokens % BS == 0 and got.cached_tokens <= (len(prompt) - 1) // BS * BS
    assert stats_since(chunked, before) == PrefixCacheStats(
        sum(len(p) for p, _ in requests), sum(out.cached_tokens for out in outs))
