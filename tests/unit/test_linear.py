"""model/linear.py: the packed oneDNN GEMM equals F.linear, in fp32 and in bf16 (packed where
oneDNN has native bf16 kernels), for any row count, and gives a row the same bits in any GEMM of
two or more rows; the bf16 engine stays close to fp32 and, on `tiny`, batch-invariant."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model.engine import Engine, SamplingParams
from model.linear import dense, linear, pack

BF16_NATIVE = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), inp=st.sampled_from([8, 64, 96, 512]),
       out=st.sampled_from([16, 128, 200]), bf16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_packed_linear_equals_f_linear(rows, inp, out, bf16, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = (torch.randn(out, inp, generator=gen) * 0.05).to(dtype)
    x = torch.randn(rows, inp, generator=gen).to(dtype)
    packed = pack(w)
    assert packed.is_mkldnn == (not bf16 or BF16_NATIVE)
    assert torch.equal(dense(packed), w)
    got, want = linear(x, packed).float(), F.linear(x.float(), w.float())
    # fp32: rounding only; bf16: the output's own rounding (8 bits) of a sum over `inp` terms
    tol = 1e-5 if not bf16 else 2 ** -7 * (x.float().abs() @ w.float().abs().T).max().item()
    scale = max(1.0, want.abs().max().item()) if not bf16 else 1.0
    assert (got - want).abs().max().item() <= tol * scale


def test_bf16_engine_is_close_to_fp32(tiny_checkpoint, assert_bf16_close):
    fp32 = Engine.from_pretrained(tiny_checkpoint)
    bf16 = Engine.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert_bf16_close(bf16, fp32, ["Hello, my name is", "The capital of France is a city that",
                                   "def f(x):\n    return"])


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(2, 64), shape=st.sampled_from([(3584, 512), (512, 1792), (200, 96)]),
       bf16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_packed_linear_rows_do_not_depend_on_the_row_count_from_two(rows, shape, bf16, seed):
    """What batch invariance rests on: a row's output is the same bits in any GEMM of 2 or more
    rows. (oneDNN's 1-row path for long inputs, 1792 here, rounds differently: the reason a
    greedy sequence on `small` can differ alone and batched; see the README.) bf16 only where it
    is packed for oneDNN: elsewhere it is plain `F.linear`, which promises nothing here."""
    if bf16 and not BF16_NATIVE:
        return
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = pack((torch.randn(*shape, generator=gen) * 0.05).to(dtype))
    x = torch.randn(64, shape[1], generator=gen).to(dtype)
    assert torch.equal(linear(x[:rows], w), linear(x, w)[:rows])


@pytest.mark.skipif(not BF16_NATIVE, reason="bf16 is packed for oneDNN only with native kernels")
def test_bf16_batched_and_chunked_equal_alone(tiny_checkpoint):
    """bf16 greedy ids are batch-invariant where every GEMM's inputs are short (`tiny`)."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = ["Hello, my name is", "def fib(n):\n    return", "Once upon a time " * 8, "日本語 😀"]
    engine = Engine.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    alone = [engine.generate(p, greedy)[0].token_ids for p in prompts]
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == alone
    chunked = Engine.from_pretrained(tiny_checkpoint, dtype="bfloat16", max_num_batched_tokens=7,
                                     max_num_seqs=2)
    assert [o.token_ids for o in chunked.generate(prompts, greedy)] == alone
