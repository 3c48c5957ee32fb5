"""Hugging Face Mixtral checkpoints, read side: only the tensors asked for, as the dtype asked for.

Reading goes through `model.safetensors.index.json` (or one `model.safetensors`), opens only the
shards that hold the requested names and copies only those tensors, converting dtype on the way.
`WeightSource` names where weights come from: a checkpoint directory, or seeded random weights
of a config built in memory. `random_tensor(name, ...)` seeds each tensor from (seed, name), so
any subset of a checkpoint (one expert, the non-expert part) can be rebuilt anywhere without the
others; `model/random_checkpoint.py` writes the same values to files.

`materialised_names()` says which tensors this process has read from a checkpoint (or built
for a WeightSource) so far: an expert actor must read its own experts' tensors and no others.

Quantized weights (model/quant.py): an FP8 checkpoint's float8_e4m3fn projections are read with
their `weight_scale` (and `input_scale`) as QuantizedWeights; `WeightSource.quantization="int8"`
quantizes the expert weights as they are read. `resolve_dtype("auto", device)` picks the
compute dtype: the checkpoint's, or float32 on a CPU without native kernels for it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from model import quant
from model.config import MixtralConfig
from model.errors import CheckpointError
from model.linear import native_dtype
from model.mixtral import tensor_shapes
from model.moe import is_expert_name
from model.progress import Progress
from model.quant import QuantizedWeight
from model.quant_checkpoint import (
    FP8_STORED,
    check_stored_dtype,
    fp8_weight,
    is_static,
    quantization_config,
)

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QK_INIT_GAIN = 8.0
RANDOM_INIT_VERSION = 2     # bump when random_tensor changes: names the cached checkpoints
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MATERIALISED: set[str] = set()     # tensor names this process read or built, see below


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name in DTYPES (a torch dtype passes through); ValueError naming
    the allowed names otherwise."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def materialised_names() -> frozenset[str]:
    """Checkpoint tensor names whose data this process has read (`load_tensors`) or built
    (`WeightSource.load` of random weights) since it started; shape checks do not count."""
    return frozenset(_MATERIALISED)


def weight_map(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the shard file that holds it."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed: {e!r}") from None
        return {name: path / file for name, file in mapping.items()}
    single = path / SINGLE_FILE
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 - handle is not iterable
    raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path}")


def check_checkpoint_dir(path: str | Path) -> None:
    """Fail at once, naming what is missing, unless `path` is a servable checkpoint: a directory
    with a readable config.json (whose quantization_config, if any, is the FP8 layout), a
    tokenizer (tokenizer.json or tokenizer.model), and shards (an index or model.safetensors)
    that exist and hold every tensor the config needs (the shard the index names holds it, in
    a float dtype), in an FP8 checkpoint with the scales of its float8_e4m3fn tensors. Raises
    CheckpointError (a ValueError). Reads no tensor data: the shards' headers only."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model path {path} has no config.json")
    try:
        cfg = MixtralConfig.from_json(path)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not a Mixtral config: {e}") from None
    quantized = quantization_config(path)               # CheckpointError: unsupported
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"model path {path} has no tokenizer.json or tokenizer.model")
    files = weight_map(path)
    gone = sorted({f.name for f in files.values() if not f.is_file()})
    if gone:
        raise CheckpointError(f"model path {path} is missing {len(gone)} shard(s) its index "
                              f"names: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}")
    absent = [n for n in tensor_shapes(cfg) if n not in files]
    if absent:
        raise CheckpointError(f"checkpoint {path} has no tensor {absent[0]!r} "
                              f"({len(absent)} of the config's tensors are missing)")
    _check_shards(files, tensor_shapes(cfg), is_static(quantized))


def _check_shards(files: dict[str, Path], shapes: dict[str, tuple[int, ...]],
                  static: bool) -> None:
    """Each tensor of `shapes` is in the shard the index names, in a dtype `load_tensors`
    reads, and a float8_e4m3fn one has the scales it needs, of shapes it reads (checked on
    empty "meta" tensors of the shapes the shards' headers give)."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in files.items():
        by_file[file].append(name)
    found: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            held = set(f.keys())
            for name in names:
                if name in shapes or name in held:      # a stale scale entry is never read
                    t = _slice(f, held, file, name)
                    fp8 = t.get_dtype() == FP8_STORED
                    found[name] = torch.empty(t.get_shape(), device="meta",
                                              dtype=quant.FP8 if fp8 else None)
    for name in shapes:
        if found[name].dtype == quant.FP8:
            fp8_weight(name, found[name], found.get, static)


def _slice(f, held: set[str], file: Path, name: str):
    """Shard `f`'s (`file`, holding `held`) slice of `name`. CheckpointError when the shard
    does not hold it or holds it in a dtype weights are not read from."""
    if name not in held:
        raise CheckpointError(f"the index names shard {file.name} for tensor {name!r}, which "
                              f"that shard does not hold")
    t = f.get_slice(name)
    check_stored_dtype(name, t.get_dtype())
    return t


def load_tensors(path: str | Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor | QuantizedWeight]:
    """Read exactly the tensors named in `shapes`, checking each shape, as `dtype` on `device`;
    a float8_e4m3fn weight (an FP8 checkpoint's) stays FP8, read with its scales as a
    QuantizedWeight. CheckpointError naming a missing tensor or scale, or a wrong shape."""
    files = weight_map(path)
    static = is_static(quantization_config(path))     # CheckpointError: one it cannot read
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in shapes:
        if name not in files:
            raise CheckpointError(f"checkpoint {path} has no tensor {name!r}")
        by_file[files[name]].append(name)
    progress = Progress(len(shapes), f"loading {len(shapes)} tensors from {path}")
    out = {}
    for file, names in sorted(by_file.items()):
        if not file.exists():
            raise CheckpointError(f"shard {file.name} (holding {names[0]!r}) is missing")
        with safe_open(file, framework="pt", device="cpu") as f:
            held = set(f.keys())
            for name in names:
                t = _slice(f, held, file, name)
                if tuple(t.get_shape()) != tuple(shapes[name]):
                    raise CheckpointError(f"tensor {name!r} has shape {tuple(t.get_shape())}, "
                                          f"expected {tuple(shapes[name])}")
                if t.get_dtype() == FP8_STORED:
                    tensor = f.get_tensor(name).to(device=device)
                    out[name] = fp8_weight(name, tensor, _scale_reader(files, file, f, device),
                                           static)
                else:
                    tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                    out[name] = tensor
                _MATERIALISED.add(name)
                progress.advance(tensor.numel() * tensor.element_size())
    progress.done()
    return out


def _scale_reader(files: dict[str, Path], file: Path, f, device: torch.device | str):
    """name -> that scale tensor on `device`, None when the checkpoint has none: from the open
    shard `f` (`file`) when it holds it (the usual case), else from its own shard."""
    def read(name: str) -> torch.Tensor | None:
        if name not in files:
            return None
        if files[name] == file:
            return f.get_tensor(name).to(device)
        with safe_open(files[name], framework="pt", device="cpu") as other:
            return other.get_tensor(name).to(device)
    return read


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where weights come from: a checkpoint directory, or seeded random weights of a config
    (built on the target device, no files). Picklable, so each actor loads its own part.
    `quantization`: "int8" quantizes the expert weights as they are loaded (model/quant.py),
    None loads them as stored."""
    path: str | None = None
    config: MixtralConfig | None = None
    seed: int = 0
    quantization: str | None = None

    def __post_init__(self):
        if self.quantization is not None and self.quantization not in quant.QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {list(quant.QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.quantization is not None and self.path is not None \
                and quantization_config(self.path) is not None:
            raise ValueError(f"quantization={self.quantization!r}: the checkpoint {self.path} "
                             f"is already quantized (its config.json quantization_config)")

    def model_config(self) -> MixtralConfig:
        return MixtralConfig.from_json(self.path) if self.path is not None else self.config

    def stored_dtype(self) -> torch.dtype:
        """The checkpoint's config.json `torch_dtype` (`dtype` since transformers 5; an FP8
        checkpoint's names the dtype of its unquantized tensors); float32 for random weights
        or a config naming none. ValueError naming it when it is none of DTYPES."""
        if self.path is None:
            return torch.float32
        raw = json.loads((Path(self.path) / "config.json").read_text())
        name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if name not in DTYPES:
            raise ValueError(f"dtype 'auto': the checkpoint's config.json names torch_dtype "
                             f"{name!r}; pass dtype, one of {sorted(DTYPES)}")
        return DTYPES[name]

    def resolve_dtype(self, dtype: str | torch.dtype,
                      device: torch.device | str = "cpu") -> torch.dtype:
        """`dtype` as a torch dtype. "auto" (the default everywhere) is the checkpoint's
        (`stored_dtype`), as Hugging Face's `from_pretrained(torch_dtype="auto")` and vLLM's
        `--dtype auto` take it, except on a CPU without native kernels for that half dtype
        (`native_dtype`): float32 there. ValueError naming `dtype` otherwise."""
        if dtype != "auto":
            return torch_dtype(dtype)
        return native_dtype(self.stored_dtype(), torch.device(device))

    def load(self, names: list[str], dtype: torch.dtype,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor | QuantizedWeight]:
        """Exactly the named weights, as `dtype` on `device`: tensors, or QuantizedWeights for
        an FP8 checkpoint's projections and, with quantization "int8", the experts' weights."""
        all_shapes = tensor_shapes(self.model_config())
        shapes = {n: all_shapes[n] for n in names}
        if self.path is not None:
            weights = load_tensors(self.path, shapes, dtype, device)
        else:
            _MATERIALISED.update(shapes)
            weights = {n: random_tensor(n, s, self.seed, dtype, device) for n, s in shapes.items()}
        if self.quantization == "int8":
            stored = [n for n, w in weights.items() if isinstance(w, QuantizedWeight)]
            if stored:
                raise CheckpointError(f"quantization='int8': {stored[0]!r} is stored quantized "
                                      f"(float8_e4m3fn) in {self.path}")
            weights.update({n: quant.quantize_int8(w) for n, w in weights.items()
                            if is_expert_name(n)})
        return weights


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded from (seed, name): N(0, 0.02) like HF's init; norm weights 1 + N(0, 0.1); q_proj and
    k_proj N(0, 0.02 * QK_INIT_GAIN), so that attention scores are large enough for positions
    to matter (with HF's init a tiny model attends almost uniformly, and a wrong RoPE position
    would leave its outputs unchanged: tests comparing two engines could not see it)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if name.endswith("norm.weight"):
        t = 1.0 + 0.1 * t
    else:
        t = 0.02 * t * (QK_INIT_GAIN if name.endswith(("q_proj.weight", "k_proj.weight")) else 1)
    return t.to(dtype)


def main(argv: list[str] | None = None) -> None:
    """`python -m model.checkpoint random ...`: model/random_checkpoint.py's CLI as a
    subcommand. Exits 2 naming a missing or unknown subcommand, or a bad option."""
    import argparse

    from model import random_checkpoint

    parser = argparse.ArgumentParser(prog="python -m model.checkpoint",
                                     description="Hugging Face Mixtral checkpoints' tools.")
    commands = parser.add_subparsers(title="commands", required=True)
    random = commands.add_parser("random", help=random_checkpoint.DESCRIPTION,
                                 description=random_checkpoint.DESCRIPTION)
    random_checkpoint.add_arguments(random)
    random_checkpoint.run(parser.parse_args(argv), random)


if __name__ == "__main__":
    main()
