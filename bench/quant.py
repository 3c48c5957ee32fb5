"""Quantized experts on the CPU at hand (issue 25): which kernel is fastest, what int8 and FP8
cost in accuracy, and what `dtype: auto` picks and gains.

    python -m bench.quant                                  # all three sections
    python -m bench.quant --sections kernels --quick       # the `small` shapes only

1. **kernels**: ms per call of y = x @ W.T for the `small` expert shapes (w1/w3 fused 3584x512,
   w2 512x1792) at 1/8/32 rows (decode) and 256 (a prefill's share of an expert), and
   Mixtral-8x7B's (28672x4096, 4096x14336) at 1 and 8 rows:
   packed fp32 and bf16 (model/linear.py `pack`), int8 through `_weight_int8pack_mm` with bf16
   and with fp32 rows, int8 as the engine runs it with fp32 rows (`pack`ed: rows converted to
   bf16 and back), int8 and FP8 converted to the rows' dtype in every call (model/quant.py's
   fallback). Median of --repeats timings, each of enough calls to fill ~0.2 s.
2. **accuracy**: int8 and FP8 engines against fp32 ones on the same --prompts random prompts
   of the `small` preset: the last position's logits' relative error (||a - b|| / ||b||, median
   and max over prompts), top-1 agreement there, and greedy tokens over --new-tokens: sequences
   identical, and the mean fraction of each sequence before it first differs. FP8 is compared
   with its own weights dequantized to fp32 (a checkpoint written by `dequantized_checkpoint`)
   and with the fp32 random weights of the same seed it was quantized from.
3. **dtype auto**: a bf16 `small` checkpoint computed in bf16 (what auto keeps with native bf16)
   and in fp32 (what auto picks without it): decode tokens/s at batch 1/8/32, medians of --runs,
   the two engines alternating in one process (bench/peer.py's `measure`).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.machine import cpu_name
from bench.peer import measure, random_prompts
from model import quant
from model.checkpoint import WeightSource
from model.engine import Engine, SamplingParams
from model.linear import linear, native_dtype, pack
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.quant")
F32, BF16 = torch.float32, torch.bfloat16
SMALL_SHAPES = [(3584, 512), (512, 1792)]          # (out, in): small's w1/w3 fused, w2
MIXTRAL_SHAPES = [(28672, 4096), (4096, 14336)]    # Mixtral-8x7B's


# ---- 1. kernels ------------------------------------------------------------------------------
def kernels(w: torch.Tensor) -> dict:
    """name -> (the rows' dtype, fn(x (n, in)) -> (n, out)), every way to multiply by `w`
    (out, in) float32 that the module doc lists."""
    q = quant.quantize_int8(w)
    q_packed = quant.pack(q)
    f8 = quant.from_fp8_checkpoint(*quant.quantize_fp8(w), None)
    w32, w16 = pack(w), pack(w.to(BF16))
    int8pack = torch.ops.aten._weight_int8pack_mm
    return {"fp32 packed": (F32, lambda x: linear(x, w32)),
            "bf16 packed": (BF16, lambda x: linear(x, w16)),
            "int8pack, bf16 rows": (BF16, q_packed.matmul),
            "int8pack, fp32 rows": (F32, lambda x: int8pack(x, q.qweight, q.scale)),
            "int8 as run, fp32 rows": (F32, q_packed.matmul),
            "int8 dequant fp32": (F32, q.matmul),
            "fp8 dequant fp32": (F32, f8.matmul),
            "fp8 dequant bf16": (BF16, f8.matmul)}


def time_ms(fn, repeats: int = 3, fill_s: float = 0.2) -> float:
    """Median over `repeats` of the mean ms per call of `fn()` over enough calls to fill
    ~`fill_s` seconds (after two warm-up calls)."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(fill_s / max(time.perf_counter() - start, 1e-6)))
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(means)


def kernel_table(shapes: list[tuple[int, int, list[int]]], repeats: int = 3,
                 fill_s: float = 0.2) -> str:
    """A markdown table: one line per (out, in, rows), one column per `kernels` entry (ms per
    call, `time_ms`)."""
    names, lines = None, []
    for out_f, in_f, rows in shapes:
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
        ways = kernels(w)
        names = list(ways)
        for n in rows:
            x = torch.randn(n, in_f)
            cells = [time_ms(functools.partial(fn, x.to(dt)), repeats, fill_s)
                     for dt, fn in ways.values()]
            lines.append(f"| {out_f}x{in_f} | {n} | " + " | ".join(f"{c:.3f}" for c in cells)
                         + " |")
            log.info("kernels %s", lines[-1])
        del w, ways
        gc.collect()
    return "\n".join([f"| weight (out x in) | rows | {' | '.join(names)} |",
                      "|---|---|" + "---|" * len(names)] + lines)


def layer_errors(shapes: list[tuple[int, int]], rows: int = 32) -> str:
    """A markdown table: each `kernels` entry's relative error ||y - y32|| / ||y32|| against
    the fp32 product, for `rows` random rows of one layer per shape."""
    lines = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
        want = x @ w.T
        ways = kernels(w)
        errors = [(fn(x.to(dt)).float() - want).norm() / want.norm() for dt, fn in ways.values()]
        lines.append(f"| {out_f}x{in_f} | {rows} | " + " | ".join(f"{e:.1e}" for e in errors)
                     + " |")
    return "\n".join([f"| weight (out x in) | rows | {' | '.join(ways)} |",
                      "|---|---|" + "---|" * len(ways)] + lines)


# ---- 2. accuracy -----------------------------------------------------------------------------
def dequantized_checkpoint(src: str | Path, out: str | Path) -> Path:
    """The FP8 checkpoint `src` rewritten at `out` with every FP8 weight dequantized to float32
    (weight * weight_scale, as model/quant.py computes it), its scales dropped and its
    quantization_config removed: the same model, unquantized. One model.safetensors."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    for name in [n for n in tensors if tensors[n].dtype == quant.FP8]:
        scale = tensors.pop(quant.scale_name(name, quant.WEIGHT_SCALE))
        tensors.pop(quant.scale_name(name, quant.INPUT_SCALE), None)
        tensors[name] = quant.from_fp8_checkpoint(tensors[name], scale, None).dequantize(F32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for file in src.iterdir():
        if file.suffix != ".safetensors" and not file.name.endswith(".index.json"):
            shutil.copy(file, out / file.name)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def outputs(path: Path, dtype: torch.dtype, quantization: str | None, prompts: list,
            new_tokens: int) -> tuple[torch.Tensor, list[list[int]]]:
    """An engine on `path`: its last position's logits (P, V) float32 for each prompt, and
    its `new_tokens` greedy tokens for each."""
    engine = Engine.from_pretrained(path, dtype=dtype, quantization=quantization,
                                    max_num_batched_tokens=4096, max_num_seqs=len(prompts))
    logits = torch.stack([t[-1] for t in engine.logits(prompts)])        # (P, V)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = [o.token_ids for o in engine.generate(prompts, params)]
    del engine
    gc.collect()
    return logits, ids


def agreement(ref: tuple, other: tuple) -> dict:
    """`outputs` of a reference and another engine compared: logits' relative error (median,
    max), top-1 agreement, greedy sequences identical, mean fraction before the first
    difference."""
    (ref_logits, ref_ids), (logits, ids) = ref, other
    rel = ((logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).tolist()
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    prefix = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r)) / len(r)
              for r, o in zip(ref_ids, ids)]
    return {"rel_median": statistics.median(rel), "rel_max": max(rel), "top1": top1,
            "identical": sum(p == 1.0 for p in prefix), "prefix": statistics.mean(prefix),
            "prompts": len(rel)}


# (what, checkpoint, dtype, quantization) and (what, against) pairs
ACCURACY_ENGINES = [("fp32", "fp32", F32, None), ("bf16", "fp32", BF16, None),
                    ("int8, fp32 rows", "fp32", F32, "int8"),
                    ("int8, bf16 rows", "fp32", BF16, "int8"),
                    ("fp8 dequantized to fp32", "fp8-dequant", F32, None),
                    ("fp8, fp32 compute", "fp8", F32, None),
                    ("fp8, bf16 compute", "fp8", BF16, None)]
ACCURACY_ROWS = [("bf16", "fp32"), ("int8, fp32 rows", "fp32"), ("int8, bf16 rows", "fp32"),
                 ("fp8, fp32 compute", "fp8 dequantized to fp32"), ("fp8, fp32 compute", "fp32"),
                 ("fp8, bf16 compute", "fp32")]


def accuracy(preset: str, prompts: int, prompt_len: int, new_tokens: int) -> dict:
    """(what, against) -> `agreement`, for ACCURACY_ROWS, on `preset`'s random checkpoints
    (seed 0)."""
    prompt_ids = random_prompts(prompts, prompt_len, seed=1)
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        fp8 = cached_random_checkpoint(preset, quantization="fp8")
        paths = {"fp32": cached_random_checkpoint(preset), "fp8": fp8,
                 "fp8-dequant": dequantized_checkpoint(fp8, Path(tmp) / "dequant")}
        outs = {}
        for what, ckpt, dtype, quantization in ACCURACY_ENGINES:
            log.info("accuracy: %s", what)
            outs[what] = outputs(paths[ckpt], dtype, quantization, prompt_ids, new_tokens)
    return {(what, ref): agreement(outs[ref], outs[what]) for what, ref in ACCURACY_ROWS}


def accuracy_table(results: dict, new_tokens: int) -> str:
    lines = ["| engine | against | logits rel. error median / max | top-1 agree (last pos.) "
             f"| greedy {new_tokens} identical | mean fraction before first difference |",
             "|---|---|---|---|---|---|"]
    for (what, ref), r in results.items():
        lines.append(f"| {what} | {ref} | {r['rel_median']:.2e} / {r['rel_max']:.2e} | "
                     f"{r['top1'] * r['prompts']:.0f} / {r['prompts']} | "
                     f"{r['identical']} / {r['prompts']} | {r['prefix']:.3f} |")
    return "\n".join(lines)


# ---- 3. dtype auto ---------------------------------------------------------------------------
def dtype_auto(preset: str, batches: list[int], runs: int, prompt_len: int,
               new_tokens: int) -> dict:
    """dtype name -> batch -> decode tok/s (median of `runs`) of `preset`'s bf16 random
    checkpoint computed in bf16 and in fp32, alternating; plus "auto": what auto picks here."""
    path = cached_random_checkpoint(preset, dtype=BF16)
    engines = {str(dt).removeprefix("torch."): Engine.from_pretrained(
        path, dtype=dt, max_num_batched_tokens=4096, max_num_seqs=max(batches))
        for dt in (BF16, F32)}
    tps: dict = {name: {b: [] for b in batches} for name in engines}
    for run in range(runs):
        for name, engine in engines.items():
            log.info("dtype auto: %s run %d/%d", name, run + 1, runs)

            def generate(prompts, max_tokens, engine=engine):
                params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                return [o.token_ids for o in engine.generate(prompts, params)]
            for b, r in measure(generate, batches, prompt_len, new_tokens).items():
                tps[name][int(b)].append(r["decode_tps"])
    out = {name: {b: statistics.median(v) for b, v in per.items()} for name, per in tps.items()}
    out["auto"] = str(WeightSource(path=str(path)).resolve_dtype("auto"))
    out["auto without native bf16"] = str(native_dtype(BF16, torch.device("cpu"),
                                                       bf16_native=False))
    return out


def auto_table(results: dict, batches: list[int]) -> str:
    lines = [f"dtype auto picks {results['auto']} here, "
             f"{results['auto without native bf16']} on a CPU without native bf16", "",
             "| batch | bf16 decode tok/s | fp32 decode tok/s | bf16 / fp32 |", "|---|---|---|---|"]
    for b in batches:
        bf, fp = results["bfloat16"][b], results["float32"][b]
        lines.append(f"| {b} | {bf:.1f} | {fp:.1f} | {bf / fp:.2f} |")
    return "\n".join(lines)


# ---- the driver ------------------------------------------------------------------------------
SECTIONS = ("kernels", "accuracy", "auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"of {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="kernels: the small shapes only")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="accuracy's prompts")
    ap.add_argument("--new-tokens", type=int, default=16, help="accuracy's greedy tokens")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="kernel timings per cell")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    batches = [int(b) for b in args.batches.split(",")]
    head = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if "kernels" in sections:
        shapes = [(o, i, [1, 8, 32, 256]) for o, i in SMALL_SHAPES]
        shapes += [] if args.quick else [(o, i, [1, 8]) for o, i in MIXTRAL_SHAPES]
        print(f"## kernels, ms per call ({head})\n\n{kernel_table(shapes, args.repeats)}\n\n"
              f"one layer's relative error against fp32\n\n{layer_errors(SMALL_SHAPES)}\n",
              flush=True)
    if "accuracy" in sections:
        acc = accuracy(args.preset, args.prompts, args.prompt_len, args.new_tokens)
        print(f"## accuracy, {args.preset}, {args.prompts} prompts of {args.prompt_len} random "
              f"ids ({head})\n\n{accuracy_table(acc, args.new_tokens)}\n", flush=True)
    if "auto" in sections:
        auto = dtype_auto(args.preset, batches, args.runs, 128, 64)
        print(f"## dtype auto: a bf16 {args.preset} checkpoint in bf16 and fp32, decode, "
              f"medians of {args.runs} ({head})\n\n{auto_table(auto, batches)}\n", flush=True)


if __name__ == "__main__":
    main()
