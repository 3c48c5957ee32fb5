"""Prefix caching changes no output (issue 23): an engine that reuses cached KV blocks equals one
that recomputes every prompt (fp32 `tiny`, token ids, logprobs and text), and reports exactly the
prompt tokens it reused, whatever the batching: chunked prefill, preemption, n > 1, two
micro-batches, failover resume, prompt logprobs.

Every test fails on the code before prefix caching (no `cached_tokens`, no
`scheduler.prefix_cache`, no `enable_prefix_caching`), and each checks an equality that a wrong
cache breaks: a hit through a chain without its parent, a block taken for other tokens, a cached
block written into, a preempted or resumed request's blocks mixed up. Prompts are random token ids
(a fresh `random.Random` per test), so no two tests share a block by chance. Helpers, and the
`prefix_engine` and `uncached` (the oracle) fixtures: tests/prefix.py, tests/unit/conftest.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import torch

from model.engine import Engine, Resume, SamplingParams
from model.prefix_cache import PrefixCacheStats
from tests.prefix import BS, assert_same, computed, expected_cached, fresh, stats_since

# 10 tokens after an 18-token prompt: 28 tokens, the last block ends on the one token sampled
# and never computed (a cache that names that block before its last key is written fails)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def cached(prefix_engine) -> Engine:
    """One caching engine for the tests that use fresh prompts and count in deltas."""
    return prefix_engine()


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
def test_outputs_with_the_cache_equal_outputs_without(prefix_engine, uncached, config, together,
                                                      params):
    engine, rng = prefix_engine(**ENGINES[config]), random.Random(1)
    base = fresh(rng, 18)
    [first] = engine.generate(base, params)
    assert first.cached_tokens == 0
    assert_same(first, uncached.generate(base, params)[0])
    cases = sharing(rng, base, first.token_ids)
    prompts = [prompt for prompt, _ in cases.values()]
    outs = (engine.generate(prompts, params) if together
            else [engine.generate(prompt, params)[0] for prompt in prompts])
    for (name, (prompt, cached)), got in zip(cases.items(), outs):
        assert got.cached_tokens == cached == expected_cached(prompt, [computed(first)]), name
        assert_same(got, uncached.generate(prompt, params)[0])
    assert engine.scheduler.prefix_cache == PrefixCacheStats(
        len(base) + sum(map(len, prompts)), sum(cached for _, cached in cases.values()))
    assert engine.num_free_blocks() == engine.kv.allocator.num_blocks       # nothing leaked
    assert uncached.scheduler.prefix_cache == PrefixCacheStats()              # off: never counted


def test_preempted_requests_equal_outputs_without_the_cache(prefix_engine, uncached):
    """30 blocks: too few for the batch at once. A preempted request re-admitted finds its own
    blocks (or what is left of them) and recomputes the rest; its re-admission is not counted."""
    engine, rng = prefix_engine(blocks=30, max_model_len=96), random.Random(2)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    base = fresh(rng, 18)
    engine.generate(base, params)
    prompts = [base[:4 * k] + fresh(rng, 6) for k in (4, 3, 2, 1, 0)]
    outs = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for prompt, got in zip(prompts, outs):
        assert_same(got, uncached.generate(prompt, params)[0])
        assert got.cached_tokens % BS == 0 and got.cached_tokens <= (len(prompt) - 1) // BS * BS
    assert sum(out.cached_tokens for out in outs) > 0
    assert engine.scheduler.prefix_cache == PrefixCacheStats(
        len(base) + sum(map(len, prompts)), sum(out.cached_tokens for out in outs))
    assert engine.num_free_blocks() == 30


def test_n_choices_take_the_cache_once_and_each_caches_its_own_tokens(uncached, cached):
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
        for got, oracle in zip(outs, uncached.generate(prompt, params)):
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


def test_prompt_logprobs_and_logits_are_computed_not_taken_but_fill_the_cache(uncached, cached):
    rng = random.Random(4)
    asked = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    base = fresh(rng, 18)
    cached.generate(base, GREEDY)
    before = dataclasses.replace(cached.scheduler.prefix_cache)
    [got], [want] = cached.generate(base, asked), uncached.generate(base, asked)
    assert got.cached_tokens == 0                 # a wrong cache: 16, and 16 positions unscored
    assert_same(got, want)
    _assert_same_scores(got.prompt_logprobs, want.prompt_logprobs)
    assert torch.allclose(cached.logits(base), uncached.logits(base), rtol=0, atol=1e-5)
    assert stats_since(cached, before) == PrefixCacheStats()     # neither looked it up
    for fill in (lambda p: cached.generate(p, asked), cached.logits):
        prompt = fresh(rng, 18)
        fill(prompt)
        assert cached.generate(prompt, GREEDY)[0].cached_tokens == 16


async def _chunks(engine, prompt, params, resume=None) -> list:
    return [c async for c in engine.stream(prompt, params, resume)]


@pytest.mark.parametrize("seed", [None, 99])
@pytest.mark.parametrize("cut, cached_tokens, hits", [(1, 8, 8), (3, 10, 12), (7, 10, 16)])
def test_a_resumed_stream_takes_its_cached_tokens_and_continues_exactly(uncached, cached, seed, cut,
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
    recomputed = asyncio.run(_chunks(uncached, prompt, params, resume))
    assert [t for c in recomputed for t in c.token_ids] == [t for c in rest for t in c.token_ids]
