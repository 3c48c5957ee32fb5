"""Helpers of the prefix-caching engine tests (tests/unit/test_prefix_engine.py,
test_prefix_blocks.py): KV blocks of BS tokens on fp32 `tiny`, random token-id prompts, and the
reference count of the prompt tokens a request finds cached."""
from __future__ import annotations

import random

import pytest
import torch

from model.attention import KVCache
from model.config import PRESETS
from model.engine import Engine
from model.prefix_cache import PrefixCacheStats

BS = 4                          # tokens per KV block: small, so short prompts span several blocks
TINY = PRESETS["tiny"]
BLOCK_BYTES = KVCache.bytes_per_block(TINY.num_hidden_layers, BS, TINY.num_key_value_heads,
                                      TINY.head_dim, torch.float32)


def engine_factory():
    """make(blocks=1024, **engine_args): a fp32 `tiny` engine with `blocks` KV blocks of BS
    tokens; every one shares one set of random weights (built once here: fresh weights cost a
    first step ~50x slower than a warm one)."""
    weights = Engine.from_config("tiny", dtype="float32", block_size=BS,
                                 kv_cache_memory=64 * BLOCK_BYTES)

    def make(blocks: int = 1024, **engine_args) -> Engine:
        return Engine(weights.model, weights.moe, weights.tokenizer, moe_begin=weights.moe_begin,
                      block_size=BS, kv_cache_memory=blocks * BLOCK_BYTES, **engine_args)
    return make


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
