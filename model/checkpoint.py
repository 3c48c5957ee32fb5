"""Hugging Face Mixtral checkpoints: read only the tensors asked for; write random ones.

Reading goes through `model.safetensors.index.json` (or one `model.safetensors`), opens only the
shards that hold the requested names and copies only those tensors, converting dtype on the way.
Writing produces the exact layout of the real checkpoints (config.json, sharded
`model-0000i-of-0000n.safetensors` + index, generation_config.json, tokenizer files) with
seeded random weights, which transformers' MixtralForCausalLM loads:

    python -m model.checkpoint random --preset small --out /tmp/small [--dtype float32] [--seed 0]

`random_tensor(name, ...)` seeds each tensor from (seed, name), so any subset of a checkpoint
(one expert, the non-expert part) can be rebuilt anywhere without the others.

`materialised_names()` says which tensors this process has read from a checkpoint (or built
for a WeightSource) so far: an expert actor must read its own experts' tensors and no others.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import PRESETS, MixtralConfig, cache_dir, resolve_config
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
            return {name: single for name in f.keys()}
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
    progress = _Progress(len(shapes), f"loading {len(shapes)} tensors from {path}")
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


class _Progress:
    """Logs a progress line at most every 2 s, then a summary."""

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


# A biased router (`hot_expert`): every token embedding gets HOT_OFFSET * sqrt(hidden_size / 64)
# added on hidden dim 0, so the residual stream carries it into every layer (after RMSNorm it
# dominates dim 0), and each layer's gate row of the hot expert reads it with weight HOT_GATE (the
# other experts' rows ignore dim 0): its logit beats the others', so nearly every token picks it
# as one of its two experts: about half of all (token, expert) rows on `tiny` and `small`.
HOT_OFFSET, HOT_GATE = 0.5, 0.5
HOT_BIAS_VERSION = 2        # bump when the bias changes: names the cached biased checkpoints


def _bias_router(name: str, t: torch.Tensor, hot_expert: int) -> torch.Tensor:
    if name == "model.embed_tokens.weight":
        t[:, 0] += HOT_OFFSET * math.sqrt(t.shape[1] / 64)
    elif name.endswith("block_sparse_moe.gate.weight"):
        t[:, 0] = 0.0                                   # the others ignore dim 0
        t[hot_expert, 0] = HOT_GATE
    return t


def write_random(cfg: MixtralConfig, out: str | Path, dtype: torch.dtype = torch.float32,
                 seed: int = 0, shard_bytes: int | None = None,
                 hot_expert: int | None = None) -> Path:
    """Write a random-weight checkpoint in the exact Hugging Face Mixtral layout to `out`.
    `hot_expert`: bias every layer's router towards that expert id (HOT_OFFSET, HOT_GATE), so
    that routing load is uneven, as in real traffic (elastic experts' tests and benchmark)."""
    if hot_expert is not None and not 0 <= hot_expert < cfg.num_local_experts:
        raise ValueError(f"hot_expert must be in [0, {cfg.num_local_experts}), got {hot_expert}")
    from model.tokenizer import Tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    sizes = {n: math.prod(s) * dtype.itemsize for n, s in shapes.items()}
    total = sum(sizes.values())
    shards = _plan_shards(sizes, shard_bytes or min(5 * 10**9, math.ceil(total / 4)))
    progress = _Progress(len(shapes), f"writing {len(shards)} shards to {out}")
    names_to_file = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in names:
            tensors[n] = random_tensor(n, shapes[n], seed, dtype)
            if hot_expert is not None:
                tensors[n] = _bias_router(n, tensors[n], hot_expert)
            progress.advance(sizes[n])
        save_file(tensors, out / file, metadata={"format": "pt"})
        os.chmod(out / file, _new_file_mode())      # safetensors creates it 0600
        names_to_file.update(dict.fromkeys(names, file))
    progress.done()
    index = {"metadata": {"total_size": total}, "weight_map": names_to_file}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf = cfg.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    Tokenizer.from_pretrained().save(out)
    return out


def _new_file_mode() -> int:
    """The mode `open()` gives a new file (0644 under the usual umask 022): config.json's, so
    other users (other nodes' Ray workers on a shared filesystem) can read the shards too."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def cached_random_checkpoint(preset: str = "tiny", seed: int = 0,
                             dtype: torch.dtype = torch.float32,
                             hot_expert: int | None = None) -> Path:
    """A random checkpoint under the cache dir, written once (atomically) and reused."""
    name = f"{preset}-seed{seed}-{str(dtype).removeprefix('torch.')}-v{RANDOM_INIT_VERSION}"
    if hot_expert is not None:
        name += f"-hot{hot_expert}-b{HOT_BIAS_VERSION}"
    path = cache_dir() / "checkpoints" / name
    if (path / "config.json").exists():
        return path
    log.info("creating the %s random checkpoint at %s (once)", preset, path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write_random(resolve_config(preset), partial, dtype, seed, hot_expert=hot_expert)
    try:
        os.replace(partial, path)
    except OSError:             # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return path


def _plan_shards(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    rnd = sub.add_parser("random", help="write a random-weight checkpoint in the HF Mixtral layout")
    rnd.add_argument("--preset", choices=sorted(PRESETS), required=True)
    rnd.add_argument("--out", required=True, help="output directory")
    rnd.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--shard-size-mb", type=int, default=None,
                     help="largest shard in MB (default: a quarter of the model, at most 5000)")
    rnd.add_argument("--hot-expert", type=int, default=None,
                     help="bias every router towards this expert id (uneven load)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shard = args.shard_size_mb * 10**6 if args.shard_size_mb else None
    path = write_random(resolve_config(args.preset), args.out, torch_dtype(args.dtype),
                        args.seed, shard, args.hot_expert)
    log.info("wrote %s checkpoint to %s", args.preset, path)


if __name__ == "__main__":
    main()
