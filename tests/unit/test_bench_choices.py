"""bench/choices.py measures what it says: on `tiny`, one request with n choices and n separate
requests seeded as the choices draw the same tokens, and the probe counts the prefill work and
the KV blocks that sharing the prompt saves (exactly, from the block arithmetic)."""
from __future__ import annotations

import pytest

from bench.choices import check_identical, measure, sides
from model.engine import Engine

PROMPT_LEN, NEW_TOKENS, N, BLOCK = 10, 4, 3, 4


@pytest.fixture(scope="module")
def engine():
    """Blocks of 4 tokens: the 10-token prompt ends mid-block (each choice copies the shared
    last block before writing); every prompt of a side fits one step, so the separate requests
    run in lockstep and hold their blocks at the same time. Prefix caching off, as the bench
    runs: separate requests each compute the prompt."""
    return Engine.from_config("tiny", dtype="float32", block_size=BLOCK,
                              max_num_batched_tokens=N * PROMPT_LEN, max_num_seqs=16,
                              enable_prefix_caching=False)


def test_n_choices_and_separate_requests_agree_and_the_probe_counts_the_savings(engine):
    prompt = [1] + list(range(100, 100 + PROMPT_LEN - 1))
    results = measure(engine, sides(prompt, N, NEW_TOKENS, 0.8, 7), rounds=2)
    one, separate = (results[side] for side in results)           # the n-choice side first
    assert check_identical(results)
    assert sorted(one[0].tokens) == list(range(N))
    assert all(len(tokens) == NEW_TOKENS for tokens in one[0].tokens.values())
    # a sequence computes its prompt and all but its last token: 13 positions, 4 blocks
    positions = PROMPT_LEN + NEW_TOKENS - 1
    blocks = -(-positions // BLOCK)
    shared = PROMPT_LEN // BLOCK                   # full prompt blocks, never copied
    for run in one:
        assert run.prompt_tokens == PROMPT_LEN
        assert run.computed == PROMPT_LEN + N * (NEW_TOKENS - 1)
        assert run.peak_blocks == shared + N * (blocks - shared)
    for run in separate:
        assert run.prompt_tokens == N * PROMPT_LEN
        assert run.computed == N * positions
        assert run.peak_blocks == N * blocks
    assert engine.num_free_blocks() == engine.kv.allocator.num_blocks    # nothing left held
