"""Prefix caching changes no output (issue 23): an engine that reuses cached KV blocks equals one
that recomputes every prompt (fp32 `tiny`, token ids, logprobs and text), and reports exactly the
prompt tokens it reused, whatever the batching: chunked prefill, preemption, n > 1, two
micro-batches, failover resume, prompt logprobs.

Every test fails on the code before prefix caching (no `cached_tokens`, no
`scheduler.prefix_cache`, no `enable_prefix_caching`), and each checks an equality that a wrong
cache breaks: a hit through a chain without its parent, a block taken for other tokens, a cached
block written into, a preempted or resumed request's blocks mixed up. Prompts are random token ids
(a fresh `random.Random` per test), so no two tests share a block by chance.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.attention import KVCache
from model.config import PRESETS
from model.engine import Engine, Resume, SamplingParams
from model.prefix_cache import PrefixCacheStats, extend_hashes

BS = 4                          # tokens per KV block: small, so short prompts span several blocks
TINY = PRESETS["tiny"]
BLOCK_BYTES = KVCache.bytes_per_block(TINY.num_hidden_layers, BS, TINY.num_key_value_heads,
                                      TINY.head_dim, torch.float32)
# 10 tokens after an 18-token prompt: 28 tokens, the last block ends on the one token sampled
# and never computed (a cache that names that block before its last key is written fails)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    """tiny(blocks=1024, **engine_args): a fp32 `tiny` engine with `blocks` KV blocks of BS
    tokens; every one shares one set of random weights (built once: fresh weights cost a
    first step ~50x slower than a warm one)."""
    weights = Engine.from_config("tiny", dtype="float32", block_size=BS,
                                 kv_cache_memory=64 * BLOCK_BYTES)

    def make(blocks: int = 1024, **engine_args) -> Engine:
        return Engine(weights.model, weights.moe, weights.tokenizer, moe_begin=weights.moe_begin,
                      block_size=BS, kv_cache_memory=blocks * BLOCK_BYTES, **engine_args)
    return make


@pytest.fixture(scope="module")
def plain(tiny) -> Engine:
    """The oracle: the same weights, every prompt computed from its first token."""
    return tiny(enable_prefix_caching=False)


@pytest.fixture(scope="module")
def cached(tiny) -> Engine:
    """One caching engine for the tests that use fresh prompts and count in deltas."""
    return tiny()


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, TINY.vocab_size) for _ in range(n)]     # 0-2 are special tokens


def computed(out) -> list[int]:
    """The tokens whose KV a finished sequence computed: its prompt and every output token but
    the last (sampled, never fed back)."""
    return out.prompt_ids + out.token_ids[:-1]


def expected_cached(prompt: list[int], earlier: list[list[int]]) -> int:
    """The reference: the full blocks `prompt` shares (from its start) with some earlier
    computed sequence, at most (len - 1) // BS of them (the last token is always computed), in
    tokens; nothing evicted."""
    limit, best = (len(prompt) - 1) // BS, 0
    for seq in earlier:
        k = 0
        while k < limit and seq[k * BS:(k + 1) * BS] == prompt[k * BS:(k + 1) * BS]:
            k += 1
        best = max(best, k)
    return best * BS


def assert_same(got, want) -> None:
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    assert got.finish_reason == want.finish_reason
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


def stats_since(engine: Engine, before: PrefixCacheStats) -> PrefixCacheStats:
    now = engine.scheduler.prefix_cache
    return PrefixCacheStats(now.queries - before.queries, now.hits - before.hits)


def sharing(rng: random.Random, base: list[int], out: list[int]) -> dict[str, tuple[list, int]]:
    """Prompts sharing 0, 1, several and all of the full blocks of `base` (18 tokens: 4 full
    blocks and 2) after it ran and generated `out` (10 tokens; 27 computed: 6 full blocks), with
    the cached tokens each must report. No two share more with each other than with `base`'s
    run, so the counts hold in any order."""
    return {
        "no block": (fresh(rng, 14), 0),
        "the first block": (base[:4] + fresh(rng, 9), 4),
        "several blocks": (base[:12] + fresh(rng, 5), 12),
        "all blocks": (list(base), 16),                  # its last 2 tokens fill no block
        "all, ending on a block": (base[:16], 12),       # the last token is always computed
        "diverging mid-block": (base[:10] + fresh(rng, 6), 8),
        # blocks 1-3 of base behind another first block, and first: a hash without its
        # parent's would take the keys of base's blocks 1-3, computed after base's block 0
        "base's blocks behind another": (fresh(rng, 4) + base[4:16] + fresh(rng, 3), 0),
        "base's blocks first": (base[4:16] + fresh(rng, 3), 0),
        # the next turn of a chat: the prompt, the whole completion and more; the block that
        # ends on the completion's last token was never computed, so never cached
        "the next turn": (base + out + fresh(rng, 3), 24),
    }


ENGINES = {"whole prompts": {}, "chunked prefill": {"max_num_batched_tokens": 5},
           "two micro-batches": {"micro_batches": 2}}


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("config, together", [
    ("whole prompts", False), ("whole prompts", True), ("chunked prefill", False),
    ("chunked prefill", True), ("two micro-batches", True)])
def test_outputs_with_the_cache_equal_outputs_without(tiny, plain, config, together, params):
    engine, rng = tiny(**ENGINES[config]), random.Random(1)
    base = fresh(rng, 18)
    [first] = engine.generate(base, params)
    assert first.cached_tokens == 0
    assert_same(first, plain.generate(base, params)[0])
    cases = sharing(rng, base, first.token_ids)
    prompts = [prompt for prompt, _ in cases.values()]
    outs = (engine.generate(prompts, params) if together
            else [engine.generate(prompt, params)[0] for prompt in prompts])
    for (name, (prompt, cached)), got in zip(cases.items(), outs):
        assert got.cached_tokens == cached == expected_cached(prompt, [computed(first)]), name
        assert_same(got, plain.generate(prompt, params)[0])
    assert engine.scheduler.prefix_cache == PrefixCacheStats(
        len(base) + sum(map(len, prompts)), sum(cached for _, cached in cases.values()))
    assert engine.num_free_blocks() == engine.kv.allocator.num_blocks       # nothing leaked
    assert plain.scheduler.prefix_cache == PrefixCacheStats()              # off: never counted


def test_preempted_requests_equal_outputs_without_the_cache(tiny, plain):
    """30 blocks: too few for the batch at once. A preempted request re-admitted finds its own
    blocks (or what is left of them) and recomputes the rest; its re-admission is not counted."""
    engine, rng = tiny(blocks=30, max_model_len=96), random.Random(2)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    base = fresh(rng, 18)
    engine.generate(base, params)
    prompts = [base[:4 * k] + fresh(rng, 6) for k in (4, 3, 2, 1, 0)]
    outs = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for prompt, got in zip(prompts, outs):
        assert_same(got, plain.generate(prompt, params)[0])
        assert got.cached_tokens % BS == 0 and got.cached_tokens <= (len(prompt) - 1) // BS * BS
    assert sum(out.cached_tokens for out in outs) > 0
    assert engine.scheduler.prefix_cache == PrefixCacheStats(
        len(base) + sum(map(len, prompts)), sum(out.cached_tokens for out in outs))
    assert engine.num_free_blocks() == 30


def test_n_choices_take_the_cache_once_and_each_caches_its_own_tokens(plain, cached):
    rng, before = random.Random(3), dataclasses.replace(cached.scheduler.prefix_cache)
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    base = fresh(rng, 18)
    first = cached.generate(base, params)
    earlier = [computed(choice) for choice in first]
    # into each choice's own generated blocks, then the prompt's blocks shared by 3 choices
    later = [base + choice.token_ids[:5] for choice in first] + [base[:12] + fresh(rng, 5)]
    hits = 0
    for prompt in [base] + later:
        outs = cached.generate(prompt, params) if prompt is not base else first
        want = expected_cached(prompt, earlier) if prompt is not base else 0
        assert [out.cached_tokens for out in outs] == [want] * 3
        for got, oracle in zip(outs, plain.generate(prompt, params)):
            assert_same(got, oracle)
        earlier += [computed(out) for out in outs]
        hits += want
    assert hits == 3 * 20 + 12
    assert stats_since(cached, before) == PrefixCacheStats(
        len(base) + sum(map(len, later)), hits)       # one lookup per request, not per choice


def _assert_same_scores(got, want) -> None:
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for (lp, top, rank), (want_lp, want_top, want_rank) in zip(got[1:], want[1:]):
        assert lp == pytest.approx(want_lp, abs=1e-5) and rank == want_rank
        assert [t for t, _ in top] == [t for t, _ in want_top]
        assert [v for _, v in top] == pytest.approx([v for _, v in want_top], abs=1e-5)


def test_prompt_logprobs_and_logits_are_computed_not_taken_but_fill_the_cache(plain, cached):
    rng = random.Random(4)
    asked = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    base = fresh(rng, 18)
    cached.generate(base, GREEDY)
    before = dataclasses.replace(cached.scheduler.prefix_cache)
    [got], [want] = cached.generate(base, asked), plain.generate(base, asked)
    assert got.cached_tokens == 0                 # a wrong cache: 16, and 16 positions unscored
    assert_same(got, want)
    _assert_same_scores(got.prompt_logprobs, want.prompt_logprobs)
    assert torch.allclose(cached.logits(base), plain.logits(base), rtol=0, atol=1e-5)
    assert stats_since(cached, before) == PrefixCacheStats()     # neither looked it up
    for fill in (lambda p: cached.generate(p, asked), cached.logits):
        prompt = fresh(rng, 18)
        fill(prompt)
        assert cached.generate(prompt, GREEDY)[0].cached_tokens == 16


async def _chunks(engine, prompt, params, resume=None) -> list:
    return [c async for c in engine.stream(prompt, params, resume)]


@pytest.mark.parametrize("seed", [None, 99])
@pytest.mark.parametrize("cut, cached_tokens, hits", [(1, 8, 8), (3, 10, 12), (7, 10, 16)])
def test_a_resumed_stream_takes_its_cached_tokens_and_continues_exactly(plain, cached, seed, cut,
                                                                        cached_tokens, hits):
    """A 10-token prompt ran 12 tokens (21 computed: 5 full blocks); resumed after `cut`, its
    prompt + tokens so far hit the blocks of the first run, `cached_tokens` capped at the
    prompt; what it streams equals the undisturbed run."""
    rng = random.Random(5 + cut + (seed or 0))
    params = SamplingParams(max_tokens=12, temperature=0.0 if seed is None else 1.0, seed=seed,
                            ignore_eos=True)
    prompt = fresh(rng, 10)
    whole = asyncio.run(_chunks(cached, prompt, params))
    got = whole[:cut]
    resume = Resume(tuple(t for c in got for t in c.token_ids),
                    tuple(lp for c in got for lp in c.logprobs), sum(len(c.text) for c in got))
    before = dataclasses.replace(cached.scheduler.prefix_cache)
    rest = asyncio.run(_chunks(cached, prompt, params, resume))
    assert stats_since(cached, before) == PrefixCacheStats(len(prompt) + cut, hits)
    assert {c.cached_tokens for c in rest} == {cached_tokens}
    assert {c.cached_tokens for c in whole} == {0}
    assert [t for c in got + rest for t in c.token_ids] == [t for c in whole for t in c.token_ids]
    assert "".join(c.text for c in got + rest) == "".join(c.text for c in whole)
    assert [lp for c in rest for lp in c.logprobs] == \
        pytest.approx([lp for c in whole[cut:] for lp in c.logprobs], abs=1e-5)
    uncached = asyncio.run(_chunks(plain, prompt, params, resume))
    assert [t for c in uncached for t in c.token_ids] == [t for c in rest for t in c.token_ids]


def _recomputed_kv(plain: Engine, tokens: list[int]) -> tuple[list, list]:
    """Per layer, (blocks, BS, K, Dh) keys and values of `tokens` computed by the oracle in one
    prefill, read from its running request's block table."""
    request_id = plain.add_request(tokens, SamplingParams(max_tokens=2, temperature=0.0))
    plain.step()                                      # the whole prompt in one step
    [req] = plain.scheduler.running
    table = req.block_table[:len(tokens) // BS]
    kv = [k[table] for k in plain.kv.k], [v[table] for v in plain.kv.v]
    plain.abort(request_id)
    return kv


def test_every_cached_block_holds_what_a_recompute_writes(tiny, plain):
    """After a mixed workload in a cache small enough that blocks are evicted and reused
    (chunked prefill, batches sharing prefixes), each block the cache names for a sequence
    holds the keys and values the oracle computes for it: none was written into after it was
    cached, nor named by another block's content."""
    engine, rng = tiny(blocks=40, max_model_len=64, max_num_batched_tokens=7), random.Random(6)
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
            want_k, want_v = _recomputed_kv(plain, seq[:len(blocks) * BS])
            for layer, (k, v) in enumerate(zip(want_k, want_v)):
                assert torch.allclose(engine.kv.k[layer][blocks], k, rtol=1e-5, atol=1e-6)
                assert torch.allclose(engine.kv.v[layer][blocks], v, rtol=1e-5, atol=1e-6)
    assert plain.num_tracked() == 0


def test_the_least_recently_released_blocks_are_evicted_first_a_chain_from_its_end(tiny):
    """16 blocks: A, then B, cache 4 blocks each; C needs 11, the 8 never used and 3 evicted:
    A's (released before B's), from the end of its chain, so A keeps its first block."""
    engine, rng = tiny(blocks=16, max_model_len=64), random.Random(7)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    a, b = fresh(rng, 16), fresh(rng, 16)
    for prompt in (a, b, fresh(rng, 41)):
        engine.generate(prompt, one)
    salt = engine.scheduler.cache_salt
    chains = [engine.kv.allocator.cached_prefix(extend_hashes([], salt, p, BS)) for p in (a, b)]
    assert list(map(len, chains)) == [1, 4]
    assert [engine.generate(p + [5], one)[0].cached_tokens for p in (b, a)] == [16, 4]


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
def one_by_one(tiny) -> Engine:
    return tiny(blocks=8192)


@pytest.fixture(scope="module")
def chunked(tiny) -> Engine:
    return tiny(blocks=8192, max_num_batched_tokens=6)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=request_sets())
def test_random_requests_sharing_random_prefixes_equal_outputs_without(plain, one_by_one,
                                                                       chunked, requests):
    """One by one, each reports exactly the reference's cached tokens; all at once under
    chunked prefill (later ones admitted once earlier ones' blocks are cached), each equals the
    oracle too, and the counts add up."""
    oracle = [plain.generate(prompt, params)[0] for prompt, params in requests]
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
