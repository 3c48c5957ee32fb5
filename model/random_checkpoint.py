"""Write random-weight Mixtral checkpoints in the exact Hugging Face layout, and its CLI.

The output is what the real checkpoints hold (config.json, sharded
`model-0000i-of-0000n.safetensors` + index, generation_config.json, the real Mixtral tokenizer
files: mistral-common's v1, or its v3 for the 32768-id vocabulary of `tiny-v3`) with seeded
random weights (`model.checkpoint.random_tensor`, seeded from (seed, name)), which
transformers' MixtralForCausalLM loads:

    python -m model.random_checkpoint --preset small --out /tmp/small [--dtype float32] [--seed 0]
    python -m model.checkpoint random --preset small --out /tmp/small-fp8 --quantization fp8

`--quantization fp8` writes the published FP8 layout (model/quant.py): every expert and
attention projection as float8_e4m3fn with a float32 per-tensor `weight_scale` and a static
`input_scale` calibrated on the unquantized weights (the largest |input| each projection saw
over CALIBRATION_TOKENS random tokens, / 448, as AutoFP8 calibrates), config.json's
`quantization_config` {quant_method fp8, activation_scheme static, ignored_layers: lm_head and
the routers}; the other tensors in `--dtype`, which config.json's torch_dtype names.

`cached_random_checkpoint(preset)` writes one once under the cache dir and reuses it (the demo,
the tests and the benchmarks). Reading checkpoints is model/checkpoint.py's job.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import quant
from model.checkpoint import (
    DTYPES,
    INDEX_FILE,
    RANDOM_INIT_VERSION,
    WeightSource,
    random_tensor,
    torch_dtype,
)
from model.config import PRESETS, MixtralConfig, cache_dir, resolve_config
from model.linear import dense
from model.mixtral import tensor_shapes
from model.moe import is_expert_name
from model.progress import Progress
from model.spm import MISTRAL_COMMON_FILES, mistral_common_model
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# A biased router (`hot_expert`): every token embedding gets HOT_OFFSET * sqrt(hidden_size / 64)
# added on hidden dim 0, so the residual stream carries it into every layer (after RMSNorm it
# dominates dim 0), and each layer's gate row of the hot expert reads it with weight HOT_GATE (the
# other experts' rows ignore dim 0): its logit beats the others', so nearly every token picks it
# as one of its two experts: about half of all (token, expert) rows on `tiny` and `small`.
HOT_OFFSET, HOT_GATE = 0.5, 0.5
HOT_BIAS_VERSION = 2        # bump when the bias changes: names the cached biased checkpoints
WRITTEN_QUANTIZATIONS = (quant.FP8_METHOD,)    # what --quantization writes
CALIBRATION_TOKENS = 256    # random tokens the static FP8 input scales are calibrated on


def _bias_router(name: str, t: torch.Tensor, hot_expert: int) -> torch.Tensor:
    if name == "model.embed_tokens.weight":
        t[:, 0] += HOT_OFFSET * math.sqrt(t.shape[1] / 64)
    elif name.endswith("block_sparse_moe.gate.weight"):
        t[:, 0] = 0.0                                   # the others ignore dim 0
        t[hot_expert, 0] = HOT_GATE
    return t


def is_fp8_name(name: str) -> bool:
    """Whether the FP8 layout quantizes this weight: the experts' and attention's projections
    (not the routers, lm_head, the embedding or the norms)."""
    return is_expert_name(name) or (".self_attn." in name and name.endswith("_proj.weight"))


def write_random(cfg: MixtralConfig, out: str | Path, dtype: torch.dtype = torch.float32,
                 seed: int = 0, shard_bytes: int | None = None,
                 hot_expert: int | None = None, quantization: str | None = None) -> Path:
    """Write a random-weight checkpoint in the exact Hugging Face Mixtral layout to `out`.
    `hot_expert`: bias every layer's router towards that expert id (HOT_OFFSET, HOT_GATE), so
    that routing load is uneven, as in real traffic (elastic experts' tests and benchmark).
    `quantization` "fp8": the published FP8 layout (module doc); ValueError with hot_expert."""
    if hot_expert is not None and not 0 <= hot_expert < cfg.num_local_experts:
        raise ValueError(f"hot_expert must be in [0, {cfg.num_local_experts}), got {hot_expert}")
    if quantization not in (None, *WRITTEN_QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {list(WRITTEN_QUANTIZATIONS)} or None, "
                         f"got {quantization!r}")
    if quantization and hot_expert is not None:
        raise ValueError("hot_expert and quantization: one or the other (the input scales are "
                         "calibrated on the unbiased weights)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    input_scales = _calibrate(cfg, seed) if quantization else {}
    sizes = {n: math.prod(s) * (1 if n in input_scales else dtype.itemsize)
             for n, s in shapes.items()}
    total = sum(sizes.values())
    shards = _plan_shards(sizes, shard_bytes or min(5 * 10**9, math.ceil(total / 4)))
    progress = Progress(len(shapes), f"writing {len(shards)} shards to {out}")
    names_to_file = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in names:
            if n in input_scales:
                w = random_tensor(n, shapes[n], seed, torch.float32)
                weight, scale = quant.quantize_fp8(w)
                tensors[n], tensors[quant.scale_name(n, quant.WEIGHT_SCALE)] = weight, scale
                tensors[quant.scale_name(n, quant.INPUT_SCALE)] = input_scales[n]
            else:
                tensors[n] = random_tensor(n, shapes[n], seed, dtype)
            if hot_expert is not None:
                tensors[n] = _bias_router(n, tensors[n], hot_expert)
            progress.advance(sizes[n])
        save_file(tensors, out / file, metadata={"format": "pt"})
        os.chmod(out / file, _new_file_mode())      # safetensors creates it 0600
        names_to_file.update(dict.fromkeys(tensors, file))
    progress.done()
    index = {"metadata": {"total_size": total}, "weight_map": names_to_file}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf = cfg.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    if quantization:
        ignored = ["lm_head"] + [f"model.layers.{i}.block_sparse_moe.gate"
                                 for i in range(cfg.num_hidden_layers)]
        hf["quantization_config"] = {"quant_method": quant.FP8_METHOD,
                                     "activation_scheme": "static", "ignored_layers": ignored}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer_for(cfg).save(out)
    return out


def _calibrate(cfg: MixtralConfig, seed: int) -> dict[str, torch.Tensor]:
    """Each FP8 projection's static input scale (0-d float32): the largest |input| it saw
    while the unquantized random model (float32, in memory) read CALIBRATION_TOKENS random
    tokens, / 448. Keyed by the projection's weight name (q, k and v share their input)."""
    from model.engine import Engine, SamplingParams  # the engine reads checkpoints

    engine = Engine.from_source(WeightSource(config=cfg, seed=seed), "float32")
    seen: dict[str, float] = {}

    def saw(name: str, x: torch.Tensor) -> None:
        seen[name] = max(seen.get(name, 0.0), float(x.abs().max()))

    def saw_all(names: list[str], x: torch.Tensor) -> None:     # a pre-hook: returns None
        for name in names:
            saw(name, x)

    for i, layer in enumerate(engine.model.model.layers):
        p = f"model.layers.{i}.self_attn."
        for module, names in ((layer.self_attn.qkv_proj, [p + f"{x}_proj.weight" for x in "qkv"]),
                              (layer.self_attn.o_proj, [p + "o_proj.weight"])):
            module.register_forward_pre_hook(
                lambda _, args, names=names: saw_all(names, args[0]))
    experts = engine.moe.__self__                          # model/moe.py LocalExperts
    plain = experts.compute

    def compute(layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        w13, _ = experts.weights[(layer, expert)]
        gate, up = torch.nn.functional.linear(x, dense(w13)).chunk(2, dim=-1)
        for w in ("w1", "w3"):
            saw(f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight", x)
        saw(f"model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
            torch.nn.functional.silu(gate) * up)
        return plain(layer, expert, x)

    experts.compute = compute
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, cfg.vocab_size, (CALIBRATION_TOKENS // 16, 16), generator=gen)
    engine.generate([p.tolist() for p in prompts], SamplingParams(max_tokens=1))
    return {n: torch.tensor(max(seen.get(n, 0.0), 1e-6) / quant.FP8_MAX)
            for n in tensor_shapes(cfg) if is_fp8_name(n)}


def tokenizer_for(cfg: MixtralConfig) -> Tokenizer:
    """mistral-common's tokenizer of the config's vocabulary: v3 for 32768 ids, else v1."""
    vocab = cfg.vocab_size if cfg.vocab_size in MISTRAL_COMMON_FILES else 32000
    return Tokenizer.from_model_file(mistral_common_model(vocab))


def _new_file_mode() -> int:
    """The mode `open()` gives a new file (0644 under the usual umask 022): config.json's, so
    other users (other nodes' Ray workers on a shared filesystem) can read the shards too."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def cached_random_checkpoint(preset: str = "tiny", seed: int = 0,
                             dtype: torch.dtype = torch.float32,
                             hot_expert: int | None = None,
                             quantization: str | None = None) -> Path:
    """A random checkpoint under the cache dir, written once (atomically) and reused."""
    name = f"{preset}-seed{seed}-{str(dtype).removeprefix('torch.')}-v{RANDOM_INIT_VERSION}"
    if hot_expert is not None:
        name += f"-hot{hot_expert}-b{HOT_BIAS_VERSION}"
    if quantization is not None:
        name += f"-{quantization}"
    path = cache_dir() / "checkpoints" / name
    if (path / "config.json").exists():
        return path
    log.info("creating the %s random checkpoint at %s (once)", preset, path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write_random(resolve_config(preset), partial, dtype, seed, hot_expert=hot_expert,
                 quantization=quantization)
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


DESCRIPTION = ("Write a random-weight checkpoint in the Hugging Face Mixtral layout "
               "(config.json, sharded safetensors + index, tokenizer files).")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The CLI's options on `parser` (this module's and `python -m model.checkpoint random`)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True,
                        help="model shape (model/config.py PRESETS): tiny and small for tests "
                             "and benchmarks (tiny-v3: tiny with the v3 vocabulary and its "
                             "tool tokens), 8x7b for Mixtral-8x7B's real sizes")
    parser.add_argument("--out", required=True,
                        help="output directory (created; existing files are overwritten)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the stored tensors, also written as config.json's "
                             "torch_dtype (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every tensor, combined with its name (default: %(default)s)")
    parser.add_argument("--shard-size-mb", type=int, default=None,
                        help="largest shard in MB, > 0 (default: a quarter of the model, at "
                             "most 5000)")
    parser.add_argument("--hot-expert", type=int, default=None,
                        help="bias every layer's router towards this expert id, in "
                             "[0, num_local_experts), for uneven routing load (default: none)")
    parser.add_argument("--quantization", choices=WRITTEN_QUANTIZATIONS, default=None,
                        help="fp8: the published FP8 layout (float8_e4m3fn projections with "
                             "per-tensor weight_scale and static input_scale; see the module "
                             "doc); default: none")
    return parser


def _parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m model.random_checkpoint",
                                                 description=DESCRIPTION))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """Write the checkpoint that `args` (add_arguments' options) ask for and log where. Exits 2
    through `parser` naming a bad option and its limit, or in one line an `--out` that is a file
    or cannot be created (other OS errors, not about `--out`, propagate)."""
    if args.shard_size_mb is not None and args.shard_size_mb <= 0:
        parser.error(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.exit(2, f"{parser.prog}: error: --out {out} is an existing file, not a "
                       "directory\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shard = args.shard_size_mb * 10**6 if args.shard_size_mb is not None else None
    try:
        path = write_random(resolve_config(args.preset), out, torch_dtype(args.dtype),
                            args.seed, shard, args.hot_expert, args.quantization)
    except ValueError as e:     # hot_expert out of range, named with its limit
        parser.error(str(e))
    except OSError as e:        # --out (or a folder above it) cannot be created
        if e.filename is None or Path(e.filename) not in (out, *out.parents):
            raise
        parser.exit(2, f"{parser.prog}: error: --out {out} cannot be created: "
                       f"{e.filename}: {e.strerror}\n")
    log.info("wrote %s checkpoint to %s", args.preset, path)
    return path


def main(argv: list[str] | None = None) -> None:
    """The CLI: parse `argv`, write the checkpoint, log where. Exits 2 naming a bad option."""
    parser = _parser()
    run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    main()
