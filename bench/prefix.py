"""What prefix caching buys: a shared system prompt, with the cache and without, side by side.

    python -m bench.prefix                  # in-process, served (RayEngine) and vLLM-CPU
    python -m bench.prefix --quick          # one run each
    python -m bench.prefix --engines ours,vllm        # no Ray (served: RayEngine alone)
    flock /tmp/ray-tests.lock python -m bench.prefix     # on a shared machine: Ray's lock

Workload (bench/prefix_workload.py): --requests prompts, each a shared system prompt of
--system-tokens random ids (BOS first) + a distinct user turn of --turn-tokens ids, on the
`small` random checkpoint in fp32, greedy, --new-tokens new tokens each (ignore_eos), in three
arrival scenarios: cold (all at once, the system prompt never seen), warm (a warm-up request saw
it, then all at once) and one-by-one (after the warm-up, each request added when the previous
one finished). Each scenario of a run has a system prompt of its own; runs use new ones.

Measured for each engine with caching off and on: TTFT p50 / p90 (from a request's add to its
first token), generated tokens/s over the scenario, the expert rows sent (tokens x top-k,
summed over layers: counted at the in-process engine's expert function, and from the
distributed dispatcher's per-layer counts), and the prompt tokens the engine reports cached
(ours: cached_tokens; vLLM: num_cached_tokens). The engines:
  * ours in-process (`Engine`) and vLLM-CPU (bench/peer.py's set-up: `make peer-venv`, its
    environment), each run of each side a fresh process, the order alternating between runs;
  * ours served: RayEngine with 8 expert actors over the ZeroMQ channel, both sides started
    once in one local Ray and alternating.
Prints medians over --runs runs, the ratios (uncached / cached TTFT p50: the goal is >= 5x on
`small`), and ours / vLLM with caching on. No timed assertion: the figures go to
docs/benchmarks/prefix.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import statistics
import sys
import time

from bench.engine import p as percentile
from bench.machine import cpu_name, load_average
from bench.peer import have_vllm, run_json, vllm_env
from bench.prefix_workload import SCENARIOS, RunBatch, Sample, measure, step_batch

log = logging.getLogger("bench.prefix")
SIDES = (False, True)                           # caching off, on


# ---- ours in-process (a worker process) ------------------------------------------------------
class RowCounter:
    """Counts the rows an in-process engine sends to its experts (N tokens x A experts per
    layer call) by wrapping its `moe` / `moe_begin`: a benchmark's probe, results unchanged."""

    def __init__(self, engine):
        self.rows = 0
        engine.moe = self._counted(engine.moe)
        if engine.moe_begin is not None:
            engine.moe_begin = self._counted(engine.moe_begin)

    def _counted(self, fn):
        def call(layer, x, weights, experts):
            self.rows += experts.numel()                        # (N, A) pairs
            return fn(layer, x, weights, experts)
        return call


def ours_run_batch(engine) -> RunBatch:
    """bench/prefix_workload.py's RunBatch over an in-process Engine."""
    from model.engine import SamplingParams

    def add(prompt: list[int], max_tokens: int) -> str:
        return engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                         ignore_eos=True))

    def step():
        return [(c.request_id, c.token_ids, c.finish_reason is not None, c.cached_tokens)
                for c in engine.step()]
    return step_batch(add, step)


def ours_counters(engine, rows: RowCounter) -> dict[str, int]:
    stats = engine.scheduler.prefix_cache
    return {"rows": rows.rows, "queries": stats.queries, "hits": stats.hits}


def worker_ours(spec: dict) -> dict:
    """The in-process side of one run (bench/prefix_workload.py's measure's spec, plus path,
    caching, step_tokens)."""
    import torch

    from model.engine import Engine
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    engine = Engine.from_pretrained(spec["path"], dtype="float32",
                                    max_num_batched_tokens=spec["step_tokens"],
                                    enable_prefix_caching=spec["caching"])
    return measure_ours(engine, spec)


def measure_ours(engine, spec: dict) -> dict:
    """bench/prefix_workload.py's measure on an in-process Engine, its rows counted."""
    rows = RowCounter(engine)
    return measure(ours_run_batch(engine), spec, lambda: ours_counters(engine, rows))


# ---- ours served (RayEngine, in this process) -------------------------------------------------
def _drain_rows(frontend) -> tuple[int, int, int]:
    """Run in the frontend actor (`__ray_call__`): the rows its dispatcher counted since the
    last drain (its `routed` queue, which only a served replica's metrics drain otherwise),
    and the prefix cache's queries and hits so far."""
    rows, routed = 0, frontend.dispatcher.routed
    while routed:
        rows += sum(routed.popleft()[1])
    stats = frontend.engine.scheduler.prefix_cache
    return rows, stats.queries, stats.hits


class ServedCounters:
    """counters() for bench/prefix_workload.py: rows since this object was made, and the
    prefix cache's counts, read from a RayEngine's frontend actor."""

    def __init__(self, engine):
        import ray
        self._get = lambda: ray.get(engine.frontend.__ray_call__.remote(_drain_rows))
        self.rows = 0
        self._get()

    def __call__(self) -> dict[str, int]:
        rows, queries, hits = self._get()
        self.rows += rows
        return {"rows": self.rows, "queries": queries, "hits": hits}


def served_run_batch(engine) -> RunBatch:
    """A RunBatch over RayEngine's streams, all opened at once."""
    from model.engine import SamplingParams

    async def one(prompt, params, start) -> Sample:
        sample = Sample(float("nan"), [], 0)
        async for chunk in engine.stream(prompt, params):
            if chunk.token_ids and not sample.ids:
                sample.ttft = time.perf_counter() - start
            sample.ids += chunk.token_ids
            sample.cached = chunk.cached_tokens
        return sample

    async def streams(prompts, max_tokens) -> list[Sample]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        return list(await asyncio.gather(*(one(p, params, start) for p in prompts)))
    return lambda prompts, max_tokens: asyncio.run(streams(prompts, max_tokens))


def measure_served(spec: dict, runs: int) -> dict[bool, list[dict]]:
    """Both sides' runs on two RayEngines (8 expert actors each) in a local Ray."""
    import ray

    from actors import RayEngine
    ray.init(address="local", logging_level=logging.WARNING)
    engines = {}
    try:
        for caching in SIDES:
            engines[caching] = RayEngine.from_pretrained(
                spec["path"], dtype="float32", engine_args={
                    "max_num_batched_tokens": spec["step_tokens"],
                    "enable_prefix_caching": caching})
        counters = {c: ServedCounters(e) for c, e in engines.items()}
        results: dict[bool, list[dict]] = {c: [] for c in SIDES}
        for run in range(runs):
            for caching in SIDES if run % 2 == 0 else SIDES[::-1]:
                log.info("served, caching %s, run %d/%d", caching, run + 1, runs)
                results[caching].append(measure(served_run_batch(engines[caching]),
                                                {**spec, "seed": run}, counters[caching]))
        return results
    finally:
        for engine in engines.values():
            engine.shutdown()
        ray.shutdown()


# ---- the driver ------------------------------------------------------------------------------
def measure_in_process(spec: dict, runs: int, ours: bool, vllm_python: str | None,
                       timeout: float) -> dict[tuple[str, bool], list[dict]]:
    """(engine, caching) -> one result per run, for ours in-process (if `ours`) and vLLM (if
    `vllm_python`); every run of every side a fresh process, the order reversed on odd runs."""
    sides = ([("ours", c) for c in SIDES if ours]
             + [("vllm", c) for c in SIDES[::-1] if vllm_python])
    env, preload = vllm_env(vllm_python) if vllm_python else (None, [])
    if preload:
        log.info("vLLM preloads %s", ", ".join(preload))
    results: dict[tuple[str, bool], list[dict]] = {side: [] for side in sides}
    for run in range(runs):
        for which, caching in sides if run % 2 == 0 else sides[::-1]:
            log.info("%s, caching %s, run %d/%d", which, caching, run + 1, runs)
            worker_spec = json.dumps({**spec, "caching": caching, "seed": run})
            cmd = ([sys.executable, "-m", "bench.prefix", "--worker", worker_spec]
                   if which == "ours" else [vllm_python, "-m", "bench.prefix_vllm", worker_spec])
            results[(which, caching)].append(
                run_json(cmd, which, env if which == "vllm" else None, timeout))
    return results


ENGINES = {"ours": "ours in-process", "served": "ours served", "vllm": "vLLM-CPU"}
FIGURES = {                             # of one scenario's Timing (as a dict)
    "p50": lambda t: percentile(t["ttft"], .5),
    "p90": lambda t: percentile(t["ttft"], .9),
    "tok/s": lambda t: sum(map(len, t["ids"])) / t["seconds"],
    "rows": lambda t: t["counted"].get("rows", math.nan),
    "cached": lambda t: sum(t["cached"]) / t["prompt_tokens"],
}


def median(runs: list[dict], scenario: str, figure: str) -> float:
    """The median over runs of one FIGURES figure of `scenario`."""
    return statistics.median(FIGURES[figure](r[scenario]) for r in runs)


def ids_equal(off: list[dict], on: list[dict], scenario: str) -> str:
    """'equal / compared' greedy outputs, request by request, of the same runs' workloads."""
    pairs = [(a, b) for x, y in zip(off, on) for a, b in zip(x[scenario]["ids"],
                                                                y[scenario]["ids"])]
    return f"{sum(a == b for a, b in pairs)} / {len(pairs)}"


def report(results: dict[tuple[str, bool], list[dict]], scenarios: list[str]) -> str:
    """The tables: each engine off / on side by side, then ours / vLLM with caching on."""
    lines = ["| engine | scenario | TTFT p50 s off / on | uncached / cached TTFT p50 | TTFT p90 s "
             "off / on | tok/s off / on | expert rows off / on | prompt tokens cached (on) "
             "| greedy ids equal |", "|---|---|---|---|---|---|---|---|---|"]
    for engine in (e for e in ENGINES if (e, True) in results):
        off, on = results[(engine, False)], results[(engine, True)]
        for s in scenarios:
            m = {(side, f): median(runs, s, f) for side, runs in (("off", off), ("on", on))
                 for f in FIGURES}
            rows = ("-" if math.isnan(m["on", "rows"]) else
                    f"{m['off', 'rows'] / 1e3:.0f}k / {m['on', 'rows'] / 1e3:.0f}k")
            lines.append(
                f"| {ENGINES[engine]} | {s} | {m['off', 'p50']:.3f} / {m['on', 'p50']:.3f} | "
                f"{m['off', 'p50'] / m['on', 'p50']:.1f}x | {m['off', 'p90']:.3f} / "
                f"{m['on', 'p90']:.3f} | {m['off', 'tok/s']:.0f} / {m['on', 'tok/s']:.0f} | "
                f"{rows} | {m['on', 'cached']:.0%} | {ids_equal(off, on, s)} |")
    if ("vllm", True) in results:
        lines += ["", "| scenario | cached TTFT p50 s: ours / vLLM | ratio | uncached: ours / "
                  "vLLM | ratio |", "|---|---|---|---|---|"]
        for s in scenarios:
            row = []
            for caching in (True, False):
                a, b = (median(results[(e, caching)], s, "p50") for e in ("ours", "vllm"))
                row += [f"{a:.3f} / {b:.3f}", f"{a / b:.2f}"]
            lines.append(f"| {s} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--turn-tokens", type=int, default=50)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--step-tokens", type=int, default=2048,
                    help="max_num_batched_tokens, every engine (ours' default)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one run")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="which of ours (in-process), served (RayEngine), vllm to measure")
    ap.add_argument("--vllm-python", default=None,
                    help="vLLM's interpreter (default .peer-venv/bin/python)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker_ours(json.loads(args.worker))), flush=True)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from bench.peer import ROOT
    from model.random_checkpoint import cached_random_checkpoint
    scenarios, engines = args.scenarios.split(","), args.engines.split(",")
    for flag, values, known in (("scenarios", scenarios, SCENARIOS), ("engines", engines, ENGINES)):
        if set(values) - set(known):
            ap.error(f"--{flag}: unknown {sorted(set(values) - set(known))}; choose from "
                     f"{', '.join(known)}")
    spec = {"path": str(cached_random_checkpoint("small")), "system_tokens": args.system_tokens,
            "turn_tokens": args.turn_tokens, "requests": args.requests,
            "new_tokens": args.new_tokens, "scenarios": scenarios,
            "step_tokens": args.step_tokens}
    runs = 1 if args.quick else args.runs
    vllm_python = args.vllm_python or str(ROOT / ".peer-venv/bin/python")
    vllm_python = vllm_python if "vllm" in engines and have_vllm(vllm_python) else None
    results = measure_in_process(spec, runs, "ours" in engines, vllm_python, args.timeout)
    if "served" in engines:
        results.update({("served", c): r for c, r in measure_served(spec, runs).items()})
    print(f"{cpu_name()}, {load_average()} at the end; small checkpoint fp32; system prompt "
          f"{args.system_tokens} + turn {args.turn_tokens} tokens, {args.requests} requests, "
          f"{args.new_tokens} greedy new tokens; {args.step_tokens} tokens per step; medians "
          f"of {runs} run(s)\n")
    print(report(results, scenarios))


if __name__ == "__main__":
    main()
