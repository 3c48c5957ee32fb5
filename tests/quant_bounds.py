"""Rounding bounds of the quantized kernels (model/quant.py), shared by tests/unit/test_quant.py
and tests/gpu/test_cuda.py.

Rounding model (u: a format's unit roundoff, half its spacing at 1):
- bfloat16 keeps 8 significant bits, U_BF16 = 2**-8; float32 24, U_FP32 = 2**-24;
  float8_e4m3fn 4, U_FP8 = 2**-4, and below its smallest normal (2**-6) a spacing of 2**-9, so
  an absolute error of at most FP8_SUBNORMAL = 2**-10 there.
- A k-term dot product accumulated in float32 errs by at most (k + 2) U_FP32 of the sum of its
  terms' magnitudes (k - 1 additions, the products, the scale). The CPU int8 kernel
  (`_weight_int8pack_mm`) also rounds x, the scale and its output to bfloat16: 3 more roundings,
  3.02 U_BF16 with their products. So |computed - x @ W.T| <= gamma * (|x| @ |W|.T).
- A linear layer whose weight errs by e (elementwise) on inputs x:
  |computed - x @ W.T| <= |x| @ (e + gamma (|W| + e)).T                                  (L)
- The FP8 GEMM (`torch._scaled_mm`) quantizes x per tensor, x / input_scale to float8_e4m3fn
  (no value clamped: input_scale >= max |x| / 448), so against the dequantized weight W
  |y - x @ W.T| <= (U_FP8 + gamma) |x| @ |W|.T + FP8_SUBNORMAL input_scale sum_j |W_ij|.
"""
from __future__ import annotations

import torch

U_BF16, U_FP32, U_FP8 = 2.0 ** -8, 2.0 ** -24, 2.0 ** -4
FP8_SUBNORMAL = 2.0 ** -10


def gamma(k: int, packed: bool) -> float:
    """The relative rounding of a k-term dot product: float32 accumulation, and with the CPU
    int8 kernel (`packed`) three bfloat16 roundings."""
    return (3.02 * U_BF16 if packed else 0.0) + (k + 2) * U_FP32


def linear_bound(x_abs: torch.Tensor, w: torch.Tensor, w_err: torch.Tensor | float,
                 g: float) -> torch.Tensor:
    """(L): x_abs (n, in), w (out, in) float64, w_err its error bound -> (n, out)."""
    return x_abs @ (w_err + g * (w.abs() + w_err)).T


def fp8_gemm_bound(x: torch.Tensor, w: torch.Tensor, input_scale: float) -> torch.Tensor:
    """The FP8 GEMM's bound: x (n, in), w (out, in) the dequantized weight, float64 on the CPU
    -> (n, out)."""
    return (linear_bound(x.abs(), w, 0.0, U_FP8 + gamma(w.shape[1], False))
            + FP8_SUBNORMAL * input_scale * w.abs().sum(dim=1))
