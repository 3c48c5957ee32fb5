"""Quantized linear weights: FP8 checkpoints as published, and int8 weight-only experts.

A `QuantizedWeight` stands where a weight tensor would (model/linear.py `linear` takes either):
W ~= qweight * scale[:, None], so y = x @ W.T = (x @ qweight.T) * scale.

- **FP8 checkpoints** (`quantization_config.quant_method == "fp8"` in config.json: the layout
  of neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8, written by AutoFP8 and read by vLLM's
  `Fp8Config`, vllm/model_executor/layers/quantization/fp8.py): each quantized projection
  `P.weight` is float8_e4m3fn with a float32 per-tensor `P.weight_scale`, and, when
  `activation_scheme` is "static", a float32 per-tensor `P.input_scale` (activations are
  quantized as x / input_scale). Quantized: the experts' w1/w2/w3 and attention's
  q/k/v/o_proj; the routers and lm_head stay in the checkpoint dtype (its `ignored_layers`).
  Compute: `torch._scaled_mm` on CUDA devices with FP8 tensor cores (compute capability 8.9
  and up: Ada, Hopper), with the checkpoint's scales; elsewhere (CPU, older GPUs) weight-only:
  the FP8 weight is converted to the compute dtype in every call (held as FP8: half of
  bf16's bytes; the activation scale is not used), `F.linear`, then the scale. On CPU the
  conversion moves bits (`fp8_to`): PyTorch's own `.to()` took 2.7 ms for a 3584x512 weight
  here, the bit moves 0.23 ms.
- **int8 weight-only** (`quantization="int8"`, any checkpoint, applied at load to the expert
  weights): symmetric per-output-channel scales, scale = max|row| / 127, q = round(w / scale).
  Compute on CPU: `torch.ops.aten._weight_int8pack_mm` with bf16 activations and bf16 scales
  (bench/quant.py, this project's Zen 4 EPYC: a 3584x512 weight took 0.03 ms for 1 row vs
  0.05 ms for the packed fp32 GEMM; with fp32 activations 0.6-20 ms). It computes each row on
  its own, so a row's output never depends on the other rows of the call (batch invariance:
  merged calls of several frontends, batched or alone). Converting the weight to bf16 once and
  running one GEMM was faster from ~32 rows on (256 rows: 1.2 vs 3.2 ms), but rounds
  differently: a switch by row count made a greedy sequence's tokens depend on the batch, so
  prefill pays the kernel's price. On CUDA the int8 weight is converted to the compute dtype
  per call, `F.linear`, then the scale.

Shapes: weights (out, in); activations x (n, in) -> y (n, out).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)      # 448
INT8_MAX = 127
# _weight_int8pack_mm reads the input dim in blocks of 16: with another size it crashed the
# process (segfault, 2+ rows) or returned garbage (1 row) in torch 2.13, so it is used only then
INT8PACK_BLOCK = 16
QUANTIZATIONS = ("int8",)                  # the `quantization` engine option's values (or None)
FP8_METHOD = "fp8"                         # config.json quantization_config.quant_method
ACTIVATION_SCHEMES = ("static", "dynamic")
WEIGHT_SCALE, INPUT_SCALE = "weight_scale", "input_scale"   # suffixes next to "weight"


def scale_name(name: str, suffix: str) -> str:
    """A weight's scale in the FP8 layout: "...q_proj.weight" -> "...q_proj.weight_scale"
    (`suffix` WEIGHT_SCALE or INPUT_SCALE)."""
    return name.removesuffix("weight") + suffix


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """W ~= qweight * scale[:, None] (out, in). `input_scale`: an FP8 checkpoint's static
    activation scale (a 0-d float32), None for dynamic scaling and for int8.
    `tensor_scale`: set by `pack` for `torch._scaled_mm` (one per-tensor scale, 0-d)."""
    qweight: torch.Tensor                   # (out, in) int8 or float8_e4m3fn
    scale: torch.Tensor                     # (out,) float32, per output channel
    input_scale: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None
    kernel_scale: torch.Tensor | None = None    # (out,) bf16, for _weight_int8pack_mm

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def kind(self) -> str:
        """"fp8" or "int8"."""
        return "fp8" if self.qweight.dtype == FP8 else "int8"

    def nbytes(self) -> int:
        """Bytes held: the 1-byte weight plus its scales."""
        return sum(t.numel() * t.element_size() for t in
                   (self.qweight, self.scale, self.input_scale, self.tensor_scale,
                    self.kernel_scale) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (out, in) in `dtype`: qweight * scale, computed in float32."""
        q = fp8_to(self.qweight, torch.float32) if self.kind == "fp8" else self.qweight.float()
        if self.tensor_scale is not None:
            return (q * self.tensor_scale).to(dtype)
        return (q * self.scale[:, None]).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(*(t.to(device) if t is not None else None
                                 for t in dataclasses.astuple(self)))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, in) -> x @ W.T (n, out) in x's dtype, by the kernel `pack` chose."""
        if self.tensor_scale is not None:
            return _scaled_mm(x, self.qweight, self.tensor_scale, self.input_scale)
        if self.kernel_scale is not None:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight,
                                                   self.kernel_scale)
            return y.to(x.dtype)
        q = fp8_to(self.qweight, x.dtype) if self.kind == "fp8" else self.qweight.to(x.dtype)
        return F.linear(x, q) * self.scale.to(x.dtype)


# float8_e4m3fn bits (s eeee mmm, exponent bias 7) moved into a wider float's sign, exponent and
# mantissa fields without re-biasing read as the value times 2**-120, subnormals included
# (bias 127 - 7 = 120 for both bfloat16 and float32); the masks keep the sign and those bits
_REBIAS = 2.0 ** 120
_BF16_MASK = 0x87F0 - 2 ** 16           # bit 15 and bits 10..4, as an int16
_FP32_MASK = 0x87F00000 - 2 ** 32       # bit 31 and bits 26..20, as an int32


def fp8_to(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float8_e4m3fn tensor as `dtype`, exactly (every finite value; NaN bytes, which
    quantized weights never hold, read as +-480): on CPU to bfloat16 / float32 by moving bits,
    4 vectorised passes (a sign-extending shift, a mask, a multiply), 5-20x faster here than
    `.to()`, which converts element by element; `.to()` elsewhere."""
    if q.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return q.to(dtype)
    if dtype == torch.bfloat16:
        bits = (q.view(torch.int8).to(torch.int16) << 4).bitwise_and_(_BF16_MASK)
    else:
        bits = (q.view(torch.int8).to(torch.int32) << 20).bitwise_and_(_FP32_MASK)
    return bits.view(dtype).mul_(_REBIAS)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """weight (out, in) -> int8 weight-only, symmetric per output channel (an all-zero row
    gets scale 1)."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / INT8_MAX                              # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight(q, scale)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight -> (float8_e4m3fn weight, 0-d float32 scale), per tensor: scale = max|w| / 448,
    as AutoFP8 and llm-compressor's FP8 scheme compute it."""
    w = weight.float()
    scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def from_fp8_checkpoint(weight: torch.Tensor, weight_scale: torch.Tensor,
                        input_scale: torch.Tensor | None) -> QuantizedWeight:
    """A checkpoint's float8_e4m3fn `weight` (out, in) with its `weight_scale` (per tensor: a
    0-d or 1-element tensor; or per channel: (out,) or (out, 1)) and `input_scale` (None or
    one value). ValueError naming the shape when a scale fits neither, or a scale that is not
    finite and > 0."""
    out = weight.shape[0]
    scale = weight_scale.float().reshape(-1)
    if scale.numel() not in (1, out):
        raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}: expected one "
                         f"value or one per output channel ({out})")
    if input_scale is not None:
        if input_scale.numel() != 1:
            raise ValueError(f"input_scale has shape {tuple(input_scale.shape)}: expected one "
                             f"value (a per-tensor static activation scale)")
        input_scale = input_scale.float().reshape(())
    for what, t in (("weight_scale", scale), ("input_scale", input_scale)):
        if t is not None and t.device.type != "meta" and not bool(
                (torch.isfinite(t) & (t > 0)).all()):
            raise ValueError(f"{what} must be finite and > 0, got {t.flatten()[:4].tolist()}")
    return QuantizedWeight(weight, scale.expand(out).contiguous(), input_scale)


def concat(weights: list) -> torch.Tensor | QuantizedWeight:
    """Weights (out_i, in) stacked along out, one GEMM for several projections (q/k/v, w1/w3):
    tensors by torch.cat; quantized ones keep each part's scales (per channel) and, for FP8,
    the largest input scale (as vLLM's fused layers take it). TypeError when mixed."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat(weights)
    if not all(isinstance(w, QuantizedWeight) for w in weights):
        raise TypeError("concat: all weights quantized or none")
    inputs = [w.input_scale for w in weights if w.input_scale is not None]
    return QuantizedWeight(torch.cat([w.qweight for w in weights]),
                           torch.cat([w.scale for w in weights]),
                           torch.stack(inputs).max() if inputs else None)


def fp8_gemm_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs FP8 on `device`: CUDA with compute capability >= 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def pack(w: QuantizedWeight) -> QuantizedWeight:
    """`w` prepared for the kernel of its device (see the module doc). FP8 for
    `torch._scaled_mm`: its per-channel scales requantized to one per-tensor scale (their
    max; exact where they were one scale, as in a checkpoint's unfused projections). int8 on
    CPU for `_weight_int8pack_mm` when its input dim is a multiple of INT8PACK_BLOCK."""
    if w.kind == "fp8" and fp8_gemm_supported(w.device):
        top = w.scale.max()
        q = w.qweight if bool((w.scale == top).all()) else (
            (w.qweight.float() * (w.scale / top)[:, None]).to(FP8))
        return QuantizedWeight(q, w.scale, w.input_scale, top.reshape(()).float())
    if w.kind == "int8" and w.device.type == "cpu" and w.shape[1] % INT8PACK_BLOCK == 0:
        return QuantizedWeight(w.qweight, w.scale, kernel_scale=w.scale.to(torch.bfloat16))
    return w


def _scaled_mm(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None) -> torch.Tensor:
    """FP8 GEMM: x quantized per tensor by `input_scale` (static) or its own max / 448
    (dynamic), then torch._scaled_mm with both scales, out in x's dtype."""
    if input_scale is None:
        input_scale = (x.abs().max().float() / FP8_MAX).clamp(min=1e-12)
    xq = (x / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(xq, qweight.t(), scale_a=input_scale, scale_b=weight_scale,
                            out_dtype=x.dtype)
