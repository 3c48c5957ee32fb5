"""Elastic experts under a biased router: balance and round trip before and after scaling the
hot expert out, how long a scale decision takes to reach the dispatcher, and the longest gap
between two tokens of running streams while it happens.

    python -m bench.elastic                       # `small` preset, hot expert 0 -> 3 replicas
    python -m bench.elastic --preset tiny --replicas 4 --clients 16

A local 4-node Ray cluster (a head for the frontend + 3 expert nodes, cluster/local.py), a
random checkpoint whose routers send about half of all rows to expert 0
(model/random_checkpoint.py: `hot_expert`), a RayEngine with one actor per expert id.
`--clients` streams loop greedy requests all along. Phases, each `--seconds` long: before (1
replica each); scale-up (`set_expert_replicas({hot: --replicas})`, timed from the call to the
new replicas' first rows); after; scale-down (back to 1). Per phase: rows per expert actor (max
/ mean, from RayEngine.expert_load over a window of the phase's length), the median per-layer
round trip under this load (the dispatcher's own timings), decode tokens per second, and
inter-token gaps (median, and the longest of any stream during the phase).

On this 2-core machine every actor shares the same cores, so a replica adds no compute: the
balance (max / mean rows) is the measured gain; what it buys on GPUs, where each actor has its
own, is the README's estimate from the measured seconds per row.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import threading
import time

from actors import RayEngine
from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, local_cluster
from model.engine import SamplingParams
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.elastic")
PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):\n    return",
           "Once upon a time", "日本語", "Experts and routers"]


class Load:
    """`clients` streams, each looping greedy requests; every token's arrival time is kept."""

    def __init__(self, engine: RayEngine, clients: int, max_tokens: int):
        self.engine, self.clients, self.max_tokens = engine, clients, max_tokens
        self.arrivals: list[list[float]] = [[] for _ in range(clients)]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async def client(i: int) -> None:
            n = 0
            while not self.stop.is_set():
                params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0,
                                        ignore_eos=True)
                last = None
                async for chunk in self.engine.stream(PROMPTS[(i + n) % len(PROMPTS)], params):
                    now = time.monotonic()
                    # a request's own gaps only: its first token follows its prefill
                    self.arrivals[i].extend([now] * len(chunk.token_ids) if last else [None])
                    last = now
                n += 1
        await asyncio.gather(*(client(i) for i in range(self.clients)))

    def gaps(self, start: float, end: float) -> list[float]:
        """Gaps between consecutive tokens of one request that arrived within [start, end)."""
        out = []
        for times in self.arrivals:
            for a, b in zip(times, times[1:]):
                if a is not None and b is not None and start <= a and b < end and b > a:
                    out.append(b - a)
        return out

    def tokens(self, start: float, end: float) -> int:
        return sum(1 for times in self.arrivals for t in times
                   if t is not None and start <= t < end)


def measure(engine: RayEngine, load: Load, name: str, seconds: float, during=None) -> dict:
    """Run one phase (`during()` in a thread at its start, timed) and summarise it."""
    ray_get = __import__("ray").get
    ray_get(engine.frontend.dispatch_timings.remote())            # clear
    start = time.monotonic()
    took = {}
    if during is not None:
        thread = threading.Thread(target=lambda: took.update(during(start)))
        thread.start()
    time.sleep(seconds)
    if during is not None:
        thread.join()
    end = time.monotonic()
    if "switched_s" in took:             # the switch is the last thing set_expert_replicas does
        switch = start + took["switched_s"]
        nan = float("nan")
        took["gap_starting_ms"] = 1e3 * max(load.gaps(start, switch - 1.0), default=nan)
        took["gap_switch_ms"] = 1e3 * max(load.gaps(switch - 1.0, switch + 1.0), default=nan)
    info = engine.expert_load()
    timings = ray_get(engine.frontend.dispatch_timings.remote())
    gaps = load.gaps(start, end)
    measured = [a.seconds_per_row for a in info.actors if a.seconds_per_row]
    row = {"phase": name, "replicas": info.replicas()[HOT], "actors": len(info.actors),
           "imbalance": info.imbalance(), "round_trip_ms": 1e3 * timings.get("total", float("nan")),
           "tokens_per_s": load.tokens(start, end) / (end - start),
           "gap_median_ms": 1e3 * statistics.median(gaps) if gaps else float("nan"),
           "gap_max_ms": 1e3 * max(gaps) if gaps else float("nan"),
           "us_per_row": 1e6 * statistics.median(measured) if measured else float("nan"), **took}
    log.info("%s: %s", name,
             {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return row


def first_rows_after(engine: RayEngine, start: float, new_count: int) -> float:
    """Seconds from `start` until every actor of the hot expert has computed rows."""
    while True:
        actors = [a for a in engine.expert_load().actors if HOT in a.expert_ids]
        if len(actors) == new_count and all(a.rows_per_s > 0 for a in actors):
            return time.monotonic() - start
        time.sleep(0.2)


HOT = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--replicas", type=int, default=3, help="replicas of the hot expert")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = cached_random_checkpoint(args.preset, hot_expert=HOT)
    with local_cluster(expert_nodes=3, expert_slots=6):
        engine = RayEngine.from_pretrained(
            path, expert_resources=EXPERT_SLOT, frontend_resources=FRONTEND_SLOT,
            frontend_threads=1, expert_threads=1,
            dispatch_args={"load_window_s": max(1.0, args.seconds)})
        load = Load(engine, args.clients, args.max_tokens)
        load.thread.start()
        time.sleep(5)                                          # warm up

        def scale(n):
            def run(start):
                engine.set_expert_replicas({HOT: n})
                applied = time.monotonic() - start
                return {"switched_s": applied, "first_rows_s": first_rows_after(engine, start, n)}
            return run
        rows = [measure(engine, load, "before", args.seconds),
                measure(engine, load, f"scale-up to {args.replicas}", args.seconds,
                        scale(args.replicas)),
                measure(engine, load, "after", args.seconds),
                measure(engine, load, "scale-down to 1", args.seconds, scale(1))]
        load.stop.set()
        load.thread.join(120)
        engine.shutdown()
    print(f"\nelastic: {args.preset}, hot expert {HOT} (about half of all rows), "
          f"{args.clients} greedy streams of {args.max_tokens} tokens, {args.seconds:g} s "
          f"per phase\n")
    print("| phase | replicas of the hot expert | expert actors | rows per actor max / mean | "
          "per-layer round trip ms | tokens/s | median gap ms | longest gap ms | "
          "scale call returned s | new replicas took rows s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['replicas']} | {r['actors']} | {r['imbalance']:.2f} | "
              f"{r['round_trip_ms']:.2f} | {r['tokens_per_s']:.1f} | {r['gap_median_ms']:.0f} | "
              f"{r['gap_max_ms']:.0f} | {r.get('switched_s', float('nan')):.1f} | "
              f"{r.get('first_rows_s', float('nan')):.1f} |")
    steady = statistics.median([rows[0]["gap_median_ms"], rows[2]["gap_median_ms"]])
    print(f"\nlongest gap during scale-up / scale-down: {rows[1]['gap_max_ms'] / steady:.2f}x / "
          f"{rows[3]['gap_max_ms'] / steady:.2f}x the steady median gap ({steady:.0f} ms); "
          "longest gap in the steady phases: "
          f"{max(rows[0]['gap_max_ms'], rows[2]['gap_max_ms']):.0f} ms")
    for r in (rows[1], rows[3]):
        print(f"{r['phase']}: longest gap while the new actors started "
              f"{r['gap_starting_ms']:.0f} ms, "
              f"within 1 s of the switch {r['gap_switch_ms']:.0f} ms "
              f"({r['gap_switch_ms'] / steady:.2f}x the steady median gap)")
    print(f"measured expert compute per row (median over actors, this CPU): "
          f"{rows[0]['us_per_row']:.1f} us")


if __name__ == "__main__":
    main()
