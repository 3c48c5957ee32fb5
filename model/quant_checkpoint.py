"""The FP8 checkpoint layout, read side (model/quant.py describes it; model/checkpoint.py reads
the files): which `quantization_config` this server serves, which stored dtypes a weight may
have, and an FP8 weight with its scales as a QuantizedWeight. Every refusal is a
CheckpointError naming the key or the tensor.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from model import quant
from model.errors import CheckpointError
from model.quant import QuantizedWeight, scale_name

# safetensors' names of the dtypes a weight may be stored in (F8_E4M3: FP8 checkpoints)
STORED_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E4M3")
FP8_STORED = "F8_E4M3"


def quantization_config(path: str | Path) -> dict | None:
    """config.json's `quantization_config`, None when it has none. CheckpointError unless it
    is the FP8 layout this server reads (model/quant.py): quant_method "fp8", per-tensor
    (no weight_block_size), activation_scheme "static" or "dynamic"."""
    raw = json.loads((Path(path) / "config.json").read_text())
    config = raw.get("quantization_config")
    if config is None:
        return None
    method = config.get("quant_method")
    if method != quant.FP8_METHOD:
        raise CheckpointError(f"config.json quantization_config.quant_method {method!r} is not "
                              f"supported: this server reads {quant.FP8_METHOD!r} checkpoints "
                              f"(or unquantized ones, with quantization='int8' at load)")
    if config.get("weight_block_size"):
        raise CheckpointError("config.json quantization_config.weight_block_size: block-wise "
                              "FP8 is not supported, only per-tensor scales")
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in quant.ACTIVATION_SCHEMES:
        raise CheckpointError(f"config.json quantization_config.activation_scheme {scheme!r}: "
                              f"expected one of {', '.join(quant.ACTIVATION_SCHEMES)}")
    return config


def is_static(config: dict | None) -> bool:
    """Whether an FP8 checkpoint's activations have static scales (each needs input_scale)."""
    return config is not None and config.get("activation_scheme", "dynamic") == "static"


def check_stored_dtype(name: str, stored: str) -> None:
    """CheckpointError unless `stored` (a safetensors dtype name) is one weights are read from."""
    if stored not in STORED_DTYPES:
        raise CheckpointError(f"tensor {name!r} is stored as {stored}: weights are read from "
                              f"{', '.join(STORED_DTYPES)} (F8_E4M3 with its weight_scale)")


def fp8_weight(name: str, weight: torch.Tensor, scale: Callable[[str], torch.Tensor | None],
               static: bool) -> QuantizedWeight:
    """An FP8 checkpoint's `name` with its `weight_scale` and its `input_scale` (required with
    static activation scales, else read where present; `scale(tensor name)`: the tensor, None
    when the checkpoint has none). CheckpointError naming a missing scale or a bad one."""
    weight_scale = scale(scale_name(name, quant.WEIGHT_SCALE))
    if weight_scale is None:
        raise CheckpointError(f"FP8 tensor {name!r} has no "
                              f"{scale_name(name, quant.WEIGHT_SCALE)!r}")
    input_scale = scale(scale_name(name, quant.INPUT_SCALE))
    if input_scale is None and static:
        raise CheckpointError(f"FP8 tensor {name!r} has no "
                              f"{scale_name(name, quant.INPUT_SCALE)!r}, which config.json's "
                              f"activation_scheme 'static' needs")
    try:
        return quant.from_fp8_checkpoint(weight, weight_scale, input_scale)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
