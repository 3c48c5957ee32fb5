"""Hugging Face Mixtral checkpoints, read side: only the tensors asked for, as the dtype asked for.

Reading goes through `model.safetensors.index.json` (or one `model.safetensors`), opens only the
shards that hold the requested names and copies only those tensors, converting dtype on the way.
`WeightSource` names where weights come from: a checkpoint directory, or seeded random weights
of a config built in memory. `random_tensor(name, ...)` seeds each tensor from (seed, name), so
any subset of a checkpoint (one expert, the non-expert part) can be rebuilt anywhere without the
others; `model/random_checkpoint.py` writes the same values to files.

`materialised_names()` says which tensors this process has read from a checkpoint (or built
for a WeightSource) so far: an expert actor must read its own experts' tensors and no others.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import MixtralConfig
from model.mixtral import tensor_shapes

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QK_INIT_GAIN = 8.0
RANDOM_INIT_VERSION = 2     # bump when random_tensor changes: names the cached checkpoints
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MATERIALISED: set[str] = set()     # tensor names this process read or built, see below


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape or is malformed; names the tensor."""


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
    with a readable config.json, a tokenizer (tokenizer.json or tokenizer.model), and shards
    (an index or model.safetensors) that exist and hold every tensor the config needs.
    Raises CheckpointError (a ValueError). Reads no tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model path {path} has no config.json")
    try:
        cfg = MixtralConfig.from_json(path)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not a Mixtral config: {e}") from None
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


def load_tensors(path: str | Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read exactly the tensors named in `shapes`, checking each shape, as `dtype` on `device`."""
    files = weight_map(path)
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
            for name in names:
                t = f.get_slice(name)
                if tuple(t.get_shape()) != tuple(shapes[name]):
                    raise CheckpointError(f"tensor {name!r} has shape {tuple(t.get_shape())}, "
                                          f"expected {tuple(shapes[name])}")
                tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                _MATERIALISED.add(name)
                out[name] = tensor
                progress.advance(tensor.numel() * tensor.element_size())
    progress.done()
    return out


class Progress:
    """Logs a progress line at most every 2 s over `total` tensors read or written (sizes in
    bytes, logged in GB), then a summary; model/random_checkpoint.py writes with it too."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.count, self.bytes = total, what, 0, 0
        self.start = self.last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.count += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= 2.0:
            self.last = now
            bar = "#" * int(20 * self.count / self.total)
            log.info("%s [%-20s] %d/%d, %.2f GB, %.1f s", self.what, bar, self.count,
                     self.total, self.bytes / 1e9, now - self.start)

    def done(self) -> None:
        log.info("%s: done, %.2f GB in %.1f s", self.what, self.bytes / 1e9,
                 time.monotonic() - self.start)


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where weights come from: a checkpoint directory, or seeded random weights of a config
    (built on the target device, no files). Picklable, so each actor loads its own part."""
    path: str | None = None
    config: MixtralConfig | None = None
    seed: int = 0

    def model_config(self) -> MixtralConfig:
        return MixtralConfig.from_json(self.path) if self.path is not None else self.config

    def resolve_dtype(self, dtype: str | torch.dtype) -> torch.dtype:
        """`dtype` as a torch dtype. "auto" (the default everywhere) is the checkpoint's
        config.json `torch_dtype` (`dtype` since transformers 5), as Hugging Face's
        `from_pretrained(torch_dtype="auto")` and vLLM's `--dtype auto` take it; float32 for
        random weights or a config naming none. ValueError naming `dtype` otherwise."""
        if dtype != "auto":
            return torch_dtype(dtype)
        if self.path is None:
            return torch.float32
        raw = json.loads((Path(self.path) / "config.json").read_text())
        name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if name not in DTYPES:
            raise ValueError(f"dtype 'auto': the checkpoint's config.json names torch_dtype "
                             f"{name!r}; pass dtype, one of {sorted(DTYPES)}")
        return DTYPES[name]

    def load(self, names: list[str], dtype: torch.dtype,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Exactly the named tensors, as `dtype` on `device`."""
        all_shapes = tensor_shapes(self.model_config())
        shapes = {n: all_shapes[n] for n in names}
        if self.path is not None:
            return load_tensors(self.path, shapes, dtype, device)
        _MATERIALISED.update(shapes)
        return {n: random_tensor(n, s, self.seed, dtype, device) for n, s in shapes.items()}


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
