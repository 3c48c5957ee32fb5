"""Structured outputs' cost: the grammar mask per decode step, and compiling a schema.

    python -m bench.grammar                 # CPU, fp32, `small` random checkpoint, batch 32
    python -m bench.grammar --quick         # 1 run
    python -m bench.grammar --device cuda   # GPU

Prints the CPU name and load, then medians over --runs runs of
  * a whole engine decode step at --batch sequences, every row constrained by a JSON schema vs
    none (the same seeded sampling otherwise), and vs a one-entry logit_bias on every row (the
    sampler pipeline's cost of any feature, grammar or not); the differences as fractions of
    the unconstrained step (the issue's goal: <= 10%);
  * the grammar's own work per step, for the batch's matchers walking the schema's document
    with random allowed tokens: `fill_masks` (llguidance's bitmask, unpacked to (R, V)),
    consuming the tokens, and `sample()` with those masks vs none; their sum is steadier than
    the difference of two whole steps on a busy machine;
  * compiling a typical schema: llguidance's view of the tokenizer (once per process), a cold
    compile (a new compiler: nothing cached) and a cached one, and a matcher per sequence.
The constrained rows stay inside an unbounded JSON string (random weights never close it), so
every timed step masks every row. No timed assertion: the figures go to
docs/benchmarks/grammar.md.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from bench.machine import add_device_arguments, compute_dtype, cpu_name, load_average
from bench.sampler import DECODE_STEPS, PROMPT_LEN, time_decode_step
from model.config import PRESETS
from model.constraint import Constraint
from model.engine import Engine
from model.grammar import GrammarCompiler, fill_masks
from model.random_checkpoint import cached_random_checkpoint
from model.sampling import SamplingParams, SamplingRow, SequenceState, sample, token_seed

log = logging.getLogger("bench.grammar")

# a typical extraction schema (nested object, array, enum, bounded numbers, a pattern, a $ref)
TYPICAL = {
    "$defs": {"address": {"type": "object", "additionalProperties": False,
                          "properties": {"street": {"type": "string"},
                                         "city": {"type": "string"},
                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                          "required": ["street", "city", "zip"]}},
    "type": "object", "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                   "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.[a-z]{2,4}$"},
                   "role": {"enum": ["admin", "user", "guest"]},
                   "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
                   "address": {"$ref": "#/$defs/address"},
                   "score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["name", "age", "email", "role", "tags", "address", "score"]}
# the decode steps' constraint: the rows stay inside "text"'s string for every timed step
RUNNING = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
           "additionalProperties": False}


SIDES = ("none", "logit_bias", "constrained")


def settings(constrained: bool, seed: int = 7, bias: bool = False) -> SamplingParams:
    """Seeded sampling; with RUNNING's constraint, or (bias) a one-entry logit_bias instead:
    any sampler feature makes the pipeline copy and process the logits, which costs the same
    with or without a grammar (the reference the grammar's own cost is measured against)."""
    c = Constraint.json_schema(RUNNING, "response_format") if constrained else None
    return SamplingParams(max_tokens=DECODE_STEPS + 4, temperature=0.8, seed=seed,
                          ignore_eos=True, constraint=c, logit_bias={5: 1.0} if bias else {})


def _median_ms(fn, steps: int, device: str) -> float:
    """Median ms of `fn()` over `steps` calls after 2 warm-up calls."""
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def time_masks(engine: Engine, batch: int, steps: int, device: str
               ) -> tuple[float, float, float]:
    """Median ms per step, for `batch` matchers walking RUNNING's document with random allowed
    tokens (a new state every step, as in the engine): `fill_masks`, consuming the drawn
    tokens, and how much longer `sample()` takes on a step's logits (B, V) with the masks than
    without. A matcher that completes its document starts again."""
    compiled = engine.grammars.compile(settings(True).constraint).result()
    matchers = [compiled.matcher() for _ in range(batch)]
    vocab, gen = engine.cfg.vocab_size, torch.Generator().manual_seed(0)
    fills, consumes = [], []
    for _ in range(steps + 2):
        start = time.perf_counter()
        masks = fill_masks(matchers, vocab, device)                          # (B, V)
        fills.append(time.perf_counter() - start)
        tokens = torch.multinomial(masks.float().cpu(), 1, generator=gen)[:, 0].tolist()
        start = time.perf_counter()
        for m, token in zip(matchers, tokens):
            m.consume(token)
        consumes.append(time.perf_counter() - start)
        matchers = [compiled.matcher() if m.finished else m for m in matchers]
    logits = torch.randn(batch, vocab, generator=gen).to(device)
    params = settings(False)
    rows = [SamplingRow(params, token_seed(7, i), [1], [], SequenceState())
            for i in range(batch)]
    draws = torch.Generator(device=device)
    eos = engine.cfg.eos_token_id
    plain = _median_ms(lambda: sample(logits, rows, eos, draws), steps, device)
    for row, mask in zip(rows, masks):
        row.mask = mask
    masked = _median_ms(lambda: sample(logits, rows, eos, draws), steps, device)
    return (statistics.median(fills[2:]) * 1e3, statistics.median(consumes[2:]) * 1e3,
            masked - plain)


def time_compile(engine: Engine) -> dict[str, float]:
    """ms to build llguidance's tokenizer, compile TYPICAL cold and cached, and copy a matcher
    (a new compiler each call: nothing cached across runs)."""
    c = Constraint.json_schema(TYPICAL, "response_format")
    compiler = GrammarCompiler(engine.tokenizer)
    start = time.perf_counter()
    compiler.compile(Constraint("regex", "x", "warm-up")).result()     # builds its tokenizer
    tokenizer = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile(c).result()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    assert compiler.compile(c).result() is compiled
    cached = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        compiled.matcher()
    matcher = (time.perf_counter() - start) / 100
    return {"tokenizer": tokenizer * 1e3, "cold": cold * 1e3, "cached": cached * 1e3,
            "matcher": matcher * 1e3}


def measure(engine: Engine, batch: int, runs: int, steps: int, device: str) -> dict:
    """{"step": {"none": [ms], "constrained": [ms]}, "masks": [ms], "consume": [ms],
    "applied": [ms], "compile": {...: [ms]}} (one entry per run)"""
    out: dict = {"step": {side: [] for side in SIDES}, "masks": [], "consume": [],
                 "applied": [], "compile": {}}
    for run in range(runs):
        for side in SIDES:
            p = settings(side == "constrained", bias=side == "logit_bias")
            out["step"][side].append(time_decode_step(engine, p, batch, device))
        for key, ms in zip(("masks", "consume", "applied"),
                           time_masks(engine, batch, steps, device)):
            out[key].append(ms)
        for key, ms in time_compile(engine).items():
            out["compile"].setdefault(key, []).append(ms)
        log.info("run %d: steps %s, masks %.2f ms", run,
                 {k: round(v[-1], 1) for k, v in out["step"].items()}, out["masks"][-1])
    return out


def report(out: dict, args, dtype, runs: int) -> str:
    none, bias, constrained = (statistics.median(out["step"][k]) for k in SIDES)
    masks, consume, applied = (statistics.median(out[k]) for k in ("masks", "consume", "applied"))
    grammar = masks + consume + applied
    c = {k: statistics.median(v) for k, v in out["compile"].items()}
    lines = [f"CPU: {cpu_name()} ({load_average()}); device {args.device}, {dtype}, "
             f"{args.threads} threads, preset {args.preset}, batch {args.batch}, "
             f"prompts of {PROMPT_LEN}; medians of {runs} runs", "",
             "| decode step | ms | vs none |", "|---|---|---|",
             f"| no row constrained | {none:.1f} | |",
             f"| no grammar, a logit_bias on every row | {bias:.1f} | "
             f"{100 * (bias - none) / none:+.1f}% |",
             f"| every row constrained (JSON schema) | {constrained:.1f} | "
             f"{100 * (constrained - none) / none:+.1f}% |",
             f"| fill_masks alone ({args.batch} rows) | {masks:.2f} | {100 * masks / none:.1f}% |",
             f"| consuming the tokens ({args.batch} rows) | {consume:.2f} | "
             f"{100 * consume / none:.1f}% |",
             f"| masks applied in sample() | {applied:.2f} | {100 * applied / none:.1f}% |",
             f"| the grammar's cost (the three) | {grammar:.2f} | {100 * grammar / none:.1f}% |",
             "", "| compile (typical schema) | ms |", "|---|---|",
             f"| llguidance tokenizer (once per process) | {c['tokenizer']:.1f} |",
             f"| cold | {c['cold']:.2f} |", f"| cached | {c['cached']:.3f} |",
             f"| a matcher per sequence | {c['matcher']:.4f} |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(ap)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50, help="fill_masks calls timed per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    runs = 1 if args.quick else args.runs
    dtype = compute_dtype(args)
    engine = (Engine.from_config(PRESETS[args.preset], dtype=dtype, device=args.device)
              if args.device.startswith("cuda")
              else Engine.from_pretrained(cached_random_checkpoint(args.preset), dtype=dtype))
    print(report(measure(engine, args.batch, runs, args.steps, args.device), args, dtype, runs))


if __name__ == "__main__":
    main()
