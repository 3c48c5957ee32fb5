"""Prefix caching on the distributed engine (issue 23): RayEngine, caching on by default, gives the
in-process engine's outputs and `cached_tokens` for requests that share prefixes, and its
dispatcher sends the expert actors no rows for the cached tokens."""
from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import ray

from model.engine import Engine, SamplingParams
from model.prefix_cache import PrefixCacheStats

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _drain(engine) -> tuple[list[int], PrefixCacheStats]:
    """(L,) rows routed per layer since the last drain (the frontend dispatcher's `routed`
    queue, which only a served replica's metrics drain otherwise), and the frontend engine's
    prefix-cache counts so far."""
    def drain(frontend) -> tuple[list[int], PrefixCacheStats]:
        rows, routed = [0] * frontend.engine.cfg.num_hidden_layers, frontend.dispatcher.routed
        while routed:
            layer, counts = routed.popleft()
            rows[layer] += sum(counts)
        return rows, dataclasses.replace(frontend.engine.scheduler.prefix_cache)
    return ray.get(engine.frontend.__ray_call__.remote(drain))


def test_cached_prefixes_equal_the_in_process_engine_and_route_no_rows(tiny_ray_engine,
                                                                        tiny_checkpoint):
    """Blocks of 16 tokens: a 40-token prompt run twice takes 32 tokens the second time; its
    first 24 tokens and more take 16; the whole prompt and more, 32. Each run routes top_k rows
    per layer for every token it computes: prompt - cached, and one per decode step. Fails
    without the cache (cached_tokens 0, every prompt token routed)."""
    reference = Engine.from_pretrained(tiny_checkpoint)
    rng = random.Random(23)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(3, reference.cfg.vocab_size) for _ in range(n)]
    base = fresh(40)
    cases = [(base, 0), (base, 32), (base[:24] + fresh(7), 16), (base + fresh(5), 32)]
    top_k, layers = reference.cfg.num_experts_per_tok, reference.cfg.num_hidden_layers
    _, before = _drain(tiny_ray_engine)
    for prompt, cached in cases:
        [got] = tiny_ray_engine.generate(prompt, GREEDY)
        rows, _ = _drain(tiny_ray_engine)
        [want] = reference.generate(prompt, GREEDY)
        assert (got.token_ids, got.text) == (want.token_ids, want.text)
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
        assert got.cached_tokens == want.cached_tokens == cached
        assert rows == [(len(prompt) - cached + GREEDY.max_tokens - 1) * top_k] * layers

    async def stream() -> list:
        return [c async for c in tiny_ray_engine.stream(base + fresh(3), GREEDY)]
    chunks = asyncio.run(stream())
    assert {c.cached_tokens for c in chunks} == {32}          # on every chunk of the stream
    _, after = _drain(tiny_ray_engine)
    assert PrefixCacheStats(after.queries - before.queries, after.hits - before.hits) == \
        PrefixCacheStats(reference.scheduler.prefix_cache.queries + 43,
                         reference.scheduler.prefix_cache.hits + 32)
