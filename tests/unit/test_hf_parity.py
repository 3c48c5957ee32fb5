"""Our logits and greedy tokens against transformers' MixtralForCausalLM (the oracle), fp32 CPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.engine import Engine, SamplingParams
from model.layers import RMSNorm

PROMPTS = [[1] + list(range(300, 341)), [1, 5, 6, 7], [1] + list(range(1000, 1019)),
           [1, 22557, 28725, 910, 460, 368, 28804]]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} > 1e-4 x logit scale {scale:.3g}"


def test_oracle_attention_depends_on_positions(hf_checkpoint):
    """The oracle must be able to see a RoPE position error (tests/conftest.py: QK_SCALE):
    moving the last token one position back changes its logits by far more than the parity
    tolerance (with transformers' plain init it is ~0.3% of the logit scale, and greedy tokens
    under a decode-only position error stayed equal)."""
    hf_model, _ = hf_checkpoint()
    for ids in PROMPTS:
        positions = torch.arange(len(ids))[None]
        shifted = positions.clone()
        shifted[0, -1] -= 1
        with torch.no_grad():
            right, wrong = (hf_model(torch.tensor([ids]), position_ids=p).logits[0, -1]
                            for p in (positions, shifted))
        assert (right - wrong).abs().max() > 0.05 * right.abs().max()


@pytest.mark.parametrize("overrides", [
    dict(),                                                   # kv ratio 2, 8 experts top-2
    dict(num_key_value_heads=4),                              # ratio 1 (MHA)
    dict(num_key_value_heads=1),                              # ratio 4
    dict(sliding_window=7),                                   # window shorter than the prompts
    dict(sliding_window=5, num_key_value_heads=1),
    dict(num_local_experts=6, num_experts_per_tok=3),         # another expert count and top-k
    dict(num_local_experts=4, num_experts_per_tok=1),
    dict(rope_theta=10000.0, head_dim=32),                    # head_dim != hidden / heads
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_logits_equal_transformers_batched(hf_checkpoint, overrides):
    hf_model, path = hf_checkpoint(**overrides)
    # a small token budget forces chunked prefill with prompts of different lengths together
    engine = Engine.from_pretrained(path, max_num_batched_tokens=24)
    ours = engine.logits(PROMPTS)
    for ids, got in zip(PROMPTS, ours):
        assert_close(got, hf_logits(hf_model, ids))
    assert engine.num_free_blocks() == engine.kv.allocator.num_blocks


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=6, num_key_value_heads=1)],
                         ids=["full", "window"])
def test_greedy_generate_batched_equals_transformers_alone(hf_checkpoint, overrides):
    hf_model, path = hf_checkpoint(**overrides)
    engine = Engine.from_pretrained(path, max_num_batched_tokens=32)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0))
    for ids, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert out.token_ids == ref[0, len(ids):].tolist()


def test_logits_single_prompt_returns_tensor(hf_checkpoint):
    hf_model, path = hf_checkpoint()
    engine = Engine.from_pretrained(path)
    got = engine.logits(PROMPTS[1])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert_close(got, hf_logits(hf_model, PROMPTS[1]))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 64), hidden=st.sampled_from([8, 64, 512, 1000]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_rms_norm_equals_transformers(rows, hidden, dtype, seed):
    """Our RMSNorm (PyTorch's fused rms_norm inside) gives transformers' MixtralRMSNorm's values."""
    modeling = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(seed)
    x = (torch.randn(rows, hidden) * 10 ** torch.empty(rows, 1).uniform_(-3, 3)).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    ours, ref = RMSNorm(hidden, 1e-5).to(dtype), modeling.MixtralRMSNorm(hidden, 1e-5).to(dtype)
    ours.weight.copy_(weight)
    with torch.no_grad():
        ref.weight.copy_(weight)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
