"""CUDA paths: the same checkpoint on GPU equals the CPU engine; flash-attn equals SDPA.
Skipped (never faked) without a CUDA device."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from model.engine import Engine, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                 reason="flash-attn is not installed")
PROMPTS = ["Hello, my name is", "The capital of France is a city that", "def f(x):\n    return"]


@pytest.fixture(scope="module")
def cpu_engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().item()
    assert (a.float().cpu() - b.float().cpu()).abs().max().item() <= rel * scale


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("flash", marks=needs_flash)])
def test_fp32_cuda_equals_cpu(tiny_checkpoint, cpu_engine, backend):
    gpu = Engine.from_pretrained(tiny_checkpoint, device="cuda", attention_backend=backend)
    ids = [cpu_engine.tokenizer.encode(p) for p in PROMPTS]
    for got, want in zip(gpu.logits(ids), cpu_engine.logits(ids)):
        _close(got, want, 1e-4)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert ([o.token_ids for o in gpu.generate(PROMPTS, params)]
            == [o.token_ids for o in cpu_engine.generate(PROMPTS, params)])


@needs_flash
def test_flash_equals_sdpa_bf16_with_window(tiny_checkpoint):
    import dataclasses
    from model.config import PRESETS
    cfg = dataclasses.replace(PRESETS["tiny"], sliding_window=5)
    engines = [Engine.from_config(cfg, dtype="bfloat16", device="cuda", attention_backend=b)
               for b in ("flash", "sdpa")]
    ids = [engines[0].tokenizer.encode(p) for p in PROMPTS]
    for a, b in zip(*(e.logits(ids) for e in engines)):
        _close(a, b, 2e-2)


def test_bf16_cuda_close_to_fp32(tiny_checkpoint, cpu_engine):
    gpu = Engine.from_pretrained(tiny_checkpoint, device="cuda", dtype="bfloat16")
    ids = cpu_engine.tokenizer.encode(PROMPTS[1])
    _close(gpu.logits(ids), cpu_engine.logits(ids), 5e-2)
    out = gpu.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.8, seed=1))
    assert all(len(o.token_ids) > 0 for o in out)
