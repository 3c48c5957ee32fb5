"""Quantized experts in RayEngine on the shared local cluster (tests/conftest.py: ray_cluster):
int8 experts (quantized in each expert actor at load) and an FP8 checkpoint's (read as FP8 by
each actor) give the in-process engine's outputs, and each actor holds 1-byte weights."""
from __future__ import annotations

import pytest

from model.config import MixtralConfig
from model.engine import Engine, SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):\n    return", "日本語"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, top_logprobs=2)
TOLERANCE = 1e-5        # of the logit scale, and of a logprob: what fp32 engines agree to


def expert_bytes(cfg: MixtralConfig, quantization: str) -> tuple[int, int]:
    """(bytes one expert id holds over its layers, bf16's bytes of the same weights, from the
    config): the 1-byte weights (w1, w3 fused: 2F x D; w2: D x F) plus the scales: int8 a float32
    scale and the CPU kernel's bfloat16 copy per output channel; FP8 its per-tensor scale
    expanded to one float32 per output channel, and one input scale per fused weight."""
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    weights, rows = 3 * f * d, 2 * f + d
    scales = 6 * rows if quantization == "int8" else 4 * rows + 4 * 2
    return layers * (weights + scales), layers * weights * 2


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_quantized_experts_equal_the_in_process_engine(ray_engine, tiny_checkpoint,
                                                       tiny_fp8_checkpoint, quantization):
    """Logits within TOLERANCE; greedy tokens equal, their logprobs and top-2 alternatives
    within TOLERANCE. Each expert actor's held bytes (info().nbytes) are exactly the 1-byte
    weights, half of bf16's (computed from the config), plus their scales: 0.54 of bf16's on
    `tiny` (its rows are 64-128 values, so the scales weigh), 0.5006 at Mixtral-8x7B's."""
    int8 = quantization == "int8"
    path = tiny_checkpoint if int8 else tiny_fp8_checkpoint
    option = "int8" if int8 else None          # an FP8 checkpoint is read as FP8 by default
    reference = Engine.from_pretrained(path, quantization=option)
    engine = ray_engine(path, quantization=option)
    try:
        ids = [reference.tokenizer.encode(p) for p in PROMPTS]
        for got, want in zip(engine.logits(ids), reference.logits(ids)):
            assert (got - want).abs().max() <= TOLERANCE * want.abs().max()
        for got, want in zip(engine.generate(ids, GREEDY), reference.generate(ids, GREEDY)):
            assert got.token_ids == want.token_ids
            assert got.logprobs == pytest.approx(want.logprobs, abs=TOLERANCE)
            assert [[t for t, _ in top] for top in got.top_logprobs] == \
                [[t for t, _ in top] for top in want.top_logprobs]
        cfg = MixtralConfig.from_json(path)
        held, bf16 = expert_bytes(cfg, quantization)
        for ids, info in zip(engine.actor_experts, engine.expert_info()):
            assert info.nbytes == held * len(ids) <= 0.54 * bf16 * len(ids)
        assert reference.moe.__self__.nbytes() == held * cfg.num_local_experts
    finally:
        engine.shutdown()
