"""bench/quant.py and bench/peer.py's precisions measure what they say: every kernel the table
times computes x @ W.T (within its quantization's error), the dequantized FP8 checkpoint is the
FP8 one's model unquantized (the same logits and tokens), the accuracy and dtype-auto sections
run on `tiny`, and the peer report sets our best against vLLM's and names what vLLM refused."""
from __future__ import annotations

import argparse

import pytest
import torch

from bench import quant as bench_quant
from bench.peer import PRECISIONS, error_line, parse_precisions
from bench.peer_report import report
from bench.quant import accuracy, agreement, dequantized_checkpoint, kernels, outputs
from model.random_checkpoint import cached_random_checkpoint


def test_every_kernel_computes_x_times_w_transposed():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    want = x @ w.T
    for name, (dtype, fn) in kernels(w).items():
        y = fn(x.to(dtype))
        assert y.shape == (5, 96) and y.dtype == dtype, name
        tol = 0.1 if "fp8" in name else 0.03            # relative, of the whole output
        assert (y.float() - want).norm() / want.norm() < tol, name
    table = bench_quant.kernel_table([(32, 16, [1, 2])], repeats=1, fill_s=0.001)
    assert table.count("\n") == 3 and "| 32x16 | 2 |" in table
    assert all(name in table.splitlines()[0] for name in kernels(w))
    errors = bench_quant.layer_errors([(32, 16)], rows=4)
    cells = errors.splitlines()[2].split("|")[3:-1]         # one per kernel
    assert errors.splitlines()[2].startswith("| 32x16 | 4 |") and len(cells) == len(kernels(w))
    assert float(cells[0]) < 1e-5 and all(float(c) < 0.1 for c in cells)   # fp32 packed first


def test_the_dequantized_fp8_checkpoint_is_the_same_model(tmp_path):
    fp8 = cached_random_checkpoint("tiny", quantization="fp8")
    plain = dequantized_checkpoint(fp8, tmp_path / "dequant")
    assert "quantization_config" not in (plain / "config.json").read_text()
    prompts = [[1, 5 + i, 40 + i, 7] for i in range(4)]
    a = outputs(fp8, torch.float32, None, prompts, 4)
    b = outputs(plain, torch.float32, None, prompts, 4)
    same = agreement(b, a)
    assert same["rel_max"] < 1e-3 and same["top1"] == 1.0 and same["identical"] == 4


def test_accuracy_and_dtype_auto_on_tiny():
    acc = accuracy("tiny", prompts=4, prompt_len=6, new_tokens=3)
    for r in acc.values():
        assert 0 <= r["rel_median"] <= r["rel_max"] < 2 and r["prompts"] == 4
    assert ("int8, fp32 rows", "fp32") in acc and ("fp8, fp32 compute", "fp32") in acc
    assert bench_quant.accuracy_table(acc, 3).count("\n") == len(acc) + 1
    auto = bench_quant.dtype_auto("tiny", [1, 2], runs=1, prompt_len=4, new_tokens=3)
    assert auto["auto"] == "torch.bfloat16" or auto["auto"] == "torch.float32"
    assert auto["auto without native bf16"] == "torch.float32"
    assert all(auto[d][b] > 0 for d in ("bfloat16", "float32") for b in (1, 2))
    assert "| 2 |" in bench_quant.auto_table(auto, [1, 2])


def test_peer_precisions_and_report():
    assert parse_precisions("fp32, int8-bf16") == ["fp32", "int8-bf16"]
    with pytest.raises(ValueError, match="--precisions.*int4"):
        parse_precisions("fp32,int4")
    assert PRECISIONS["fp8"] == ("fp8", "bfloat16", None)
    assert error_line("Traceback\n  File x\nValueError: fp8 needs a GPU\n\n") == (
        "ValueError: fp8 needs a GPU")
    vllm = ("(Worker pid=1) ERROR 12-07 [x.py:953] RuntimeError: _C::static_scaled_fp8_quant() "
            "expected at most 0 argument(s)\nRuntimeError: Engine core initialization failed. "
            "See root cause above. Failed core proc(s): {}\n")
    assert error_line(vllm) == ("RuntimeError: _C::static_scaled_fp8_quant() expected at most 0 "
                                "argument(s)")

    def run(tps):
        return {"1": {"decode_tps": tps, "ttft": 0.1, "ids": [[1, 2]]}}
    results = {("ours", "fp32"): [run(10.0)], ("vllm", "fp32"): [run(20.0)],
               ("ours", "int8-bf16"): [run(30.0)], ("ours", "fp8"): [run(5.0)],
               ("vllm", "fp8"): "not supported: ValueError: fp8 needs a GPU"}
    args = argparse.Namespace(prompt_len=4, new_tokens=2, runs=1, max_num_batched_tokens=64,
                              batches=[1])
    text = report(results, args, ["fp32", "int8-bf16", "fp8"], [])
    assert "| fp32 | 1 | 10.0 | 20.0 | 0.50 |" in text
    assert "| fp8 | 1 | 5.0 | not supported: ValueError: fp8 needs a GPU | - | 0.10 / - |" in text
    assert "| 1 | 30.0 (int8-bf16) | 20.0 (fp32) | 1.50 |" in text
