"""KV cache sizing: the default max_model_len is what the cache holds (with a warning), an
explicit one that does not fit is the error, and the CPU budget follows the machine's memory."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from model import kv_sizing
from model.config import PRESETS
from model.engine import Engine, SamplingParams
from model.kv_sizing import size_kv_cache

CPU = torch.device("cpu")
MIXTRAL = PRESETS["8x7b"]                            # 32 layers, 8 kv heads, head_dim 128
BLOCK = 2 * 32 * 16 * 8 * 128 * 2                     # bytes of one bf16 16-token block: 2 MiB


def test_the_docstring_example():
    size = size_kv_cache(MIXTRAL, 16, torch.bfloat16, CPU, kv_cache_memory=2 * 2**30)
    assert BLOCK == 2 * 2**20 and size.max_model_len == 16384 and size.num_blocks == 1024


def test_default_max_model_len_is_what_the_cache_holds_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="model.kv_sizing"):
        size = size_kv_cache(MIXTRAL, 16, torch.bfloat16, CPU, kv_cache_memory=100 * BLOCK + 7)
    assert size.max_model_len == 1600 and size.num_blocks == 100
    [record] = caplog.records
    for fact in ("1600", "32768", "kv_cache_memory", "max_model_len"):
        assert fact in record.getMessage()


def test_an_explicit_max_model_len_that_does_not_fit_is_the_error():
    with pytest.raises(ValueError,
                       match=r"max_model_len \(1700\) does not fit.* holds 1600 tokens"):
        size_kv_cache(MIXTRAL, 16, torch.bfloat16, CPU, kv_cache_memory=100 * BLOCK,
                      max_model_len=1700)
    with pytest.raises(ValueError, match=r"max_model_len \(40000\) exceeds .*\(32768\)"):
        size_kv_cache(MIXTRAL, 16, torch.bfloat16, CPU, kv_cache_memory=10**12, max_model_len=40000)
    fits = size_kv_cache(MIXTRAL, 16, torch.bfloat16, CPU, kv_cache_memory=100 * BLOCK,
                         max_model_len=1600)
    assert fits.max_model_len == 1600


def test_a_budget_below_one_block_is_the_error():
    with pytest.raises(ValueError, match="holds no 16-token block"):
        size_kv_cache(MIXTRAL, 16, torch.bfloat16, CPU, kv_cache_memory=BLOCK - 1)


def test_blocks_are_capped_at_what_max_num_seqs_can_use():
    size = size_kv_cache(MIXTRAL, 16, torch.bfloat16, CPU, kv_cache_memory=10**12, max_num_seqs=2)
    assert size.max_model_len == 32768 and size.num_blocks == 2 * 32768 // 16


def test_the_cpu_budget_follows_available_memory(monkeypatch):
    monkeypatch.setattr(kv_sizing, "available_memory", lambda: 40 * 2**30)
    assert kv_sizing.default_kv_cache_memory(CPU) == 4 * 2**30
    monkeypatch.setattr(kv_sizing, "available_memory", lambda: 2**20)
    assert kv_sizing.default_kv_cache_memory(CPU) == kv_sizing.CPU_KV_MIN_BYTES
    assert kv_sizing.available_memory() > 0


def test_a_transformers_default_checkpoint_loads(hf_checkpoint):
    """transformers' MixtralConfig default max_position_embeddings is 131072."""
    _, path = hf_checkpoint(max_position_embeddings=131072)
    per_block = 2 * 2 * 16 * 2 * 16 * 4                   # 2 layers, 2 kv heads, head_dim 16, fp32
    engine = Engine.from_pretrained(path, kv_cache_memory=1000 * per_block)
    assert engine.max_model_len == 16000
    out = engine.generate("hello", SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out.token_ids) == 4
    with pytest.raises(ValueError, match="does not fit"):
        Engine.from_pretrained(path, kv_cache_memory=1000 * per_block, max_model_len=20000)


def test_the_real_8x7b_shape_on_this_cpu_sizes_itself():
    cfg = dataclasses.replace(MIXTRAL)
    size = size_kv_cache(cfg, 16, torch.bfloat16, CPU)
    assert 0 < size.max_model_len <= 32768 and size.num_blocks * 16 >= size.max_model_len
