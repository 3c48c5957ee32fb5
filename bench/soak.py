"""Soak and back-pressure: steady streaming load for minutes, then an overload far past the
queue's bound, then steady load again. Tracks what must not grow: the engine's KV blocks in use
and tracked requests (0 whenever the server is idle) and each process's resident memory.

    python -m bench.soak                   # 10 minutes steady, 32 clients, tiny model
    python -m bench.soak --minutes 2 --clients 16

A local 4-node Ray cluster, the demo `tiny` checkpoint, an engine with max_num_seqs 32 and
max_waiting 64. Phases: steady (`--clients` looping streaming requests from bench/loadgen.py,
gRPC and HTTP, some cancelling); overload (`--burst` requests at once for 30 s, looping: most
must be refused with RESOURCE_EXHAUSTED / HTTP 429, none may fail otherwise); steady again for a
minute (the server recovers). Every 15 s it samples the engine (ModelInfo's KV blocks, tracked
requests) and the resident memory (RSS) of every process of the server; at the end it prints
each role's RSS after warm-up, at its peak and at the end, and the outcome counts.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path

import ray
from ray import serve

from bench import loadgen
from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, free_port, local_cluster
from deploy.app import build_app, serve_start_options
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.soak")
APP = "soak"
SAMPLE_S = 15.0
ROLES = {"ExpertWorker": "expert actors (sum)",
         f"ServeReplica:{APP}:EngineServer": "engine replica",
         f"ServeReplica:{APP}:Gateway": "gateway", "ProxyActor": "Serve proxy",
         "ServeController": "Serve controller"}


def rss_by_role() -> dict[str, float]:
    """MiB resident per role (summed over its processes), from /proc of the live actors' pids."""
    out: dict[str, float] = collections.defaultdict(float)
    for actor in ray._private.state.actors(actor_state_name="ALIVE").values():
        role = ROLES.get(actor["ActorClassName"])
        if role is None:
            continue
        try:
            for line in Path(f"/proc/{actor['Pid']}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[role] += int(line.split()[1]) / 1024
        except OSError:
            continue
    return dict(out)


async def steady(seconds: float, clients: int, grpc_address: str, http_url: str, model: str,
                 outcomes: collections.Counter, seed: int) -> None:
    """`clients` loops, each sending one job after another, gRPC and OpenAI HTTP in turn (one
    in 8 leaving after two chunks), until `seconds` pass."""
    deadline = time.monotonic() + seconds

    async def loop(i: int, pool: loadgen.Clients):
        n = 0
        while time.monotonic() < deadline:
            pair = loadgen.make_jobs(2, seed=seed * 100_000 + i * 1000 + n, cancel_every=0)
            job = pair[(i + n) % 2]                        # make_jobs alternates gRPC and HTTP
            if n % 8 == 7:
                job = dataclasses.replace(job, cancel_after=2)
            outcomes[(await pool.run(job)).status] += 1
            n += 1
    async with loadgen.Clients(grpc_address, http_url, model, connections=clients + 8) as pool:
        await asyncio.gather(*(loop(i, pool) for i in range(clients)))


async def sampler(engine, samples: list, stop: asyncio.Event, phase: list[str]) -> None:
    started = time.monotonic()
    while not stop.is_set():
        info = await engine.info.remote()
        samples.append((time.monotonic() - started, phase[0], info.total_blocks - info.free_blocks,
                        info.tracked_requests, rss_by_role()))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_S)


async def run(args, grpc_address: str, http_url: str, model: str) -> tuple[list, dict]:
    engine = serve.get_deployment_handle("EngineServer", APP)
    samples, stop, phase = [], asyncio.Event(), ["steady"]
    outcomes = {p: collections.Counter() for p in ("steady", "overload", "recovery")}
    sampling = asyncio.ensure_future(sampler(engine, samples, stop, phase))
    log.info("steady: %d clients for %g min", args.clients, args.minutes)
    await steady(args.minutes * 60, args.clients, grpc_address, http_url, model,
                 outcomes["steady"], 1)
    phase[0] = "overload"
    log.info("overload: %d clients for 30 s", args.burst)
    await steady(30, args.burst, grpc_address, http_url, model, outcomes["overload"], 2)
    phase[0] = "recovery"
    log.info("recovery: %d clients for 60 s", args.clients)
    await steady(60, args.clients, grpc_address, http_url, model, outcomes["recovery"], 3)
    await asyncio.sleep(3)                      # cancels land asynchronously
    phase[0] = "idle"
    info = await engine.info.remote()
    samples.append((samples[-1][0] + 1, "idle", info.total_blocks - info.free_blocks,
                    info.tracked_requests, rss_by_role()))
    stop.set()
    await sampling
    return samples, outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="steady phase")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--burst", type=int, default=400, help="clients during the overload")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = cached_random_checkpoint("tiny")
    with local_cluster(expert_nodes=3, expert_slots=6):
        grpc_port, http_port = free_port(), free_port()
        serve.start(**serve_start_options(grpc_port, http_port))
        serve.run(build_app({"model": str(path), "expert_resources": EXPERT_SLOT,
                             "frontend_resources": FRONTEND_SLOT, "frontend_threads": 1,
                             "expert_threads": 1,
                             "engine_args": {"max_num_seqs": 32, "max_waiting": 64}}),
                  name=APP, route_prefix="/")
        samples, outcomes = asyncio.run(run(args, f"127.0.0.1:{grpc_port}",
                                            f"http://127.0.0.1:{http_port}", path.name))
        serve.shutdown()
    warm = next((s for s in samples if s[0] >= 60), samples[0])      # after a minute of load
    end = [s for s in samples if s[1] == "idle"][-1]
    steady_end = [s for s in samples if s[1] == "steady"][-1]
    print(f"\nsoak: {args.minutes:g} min steady at {args.clients} clients, 30 s at "
          f"{args.burst}, 60 s at {args.clients}; samples every {SAMPLE_S:g} s")
    print("| phase | requests | ok | cancelled | refused (RESOURCE_EXHAUSTED / 429) | other |")
    print("|---|---|---|---|---|---|")
    for phase, c in outcomes.items():
        refused = c["RESOURCE_EXHAUSTED"] + c["HTTP 429"]
        other = sum(c.values()) - c["ok"] - c["cancelled"] - refused
        print(f"| {phase} | {sum(c.values())} | {c['ok']} | {c['cancelled']} | {refused} "
              f"| {other} |")
    print("\n| process | RSS after 1 min MiB | end of steady | growth in steady | peak "
          "| at the end |")
    print("|---|---|---|---|---|---|")
    for role in sorted(end[4]):
        peak = max(s[4].get(role, 0) for s in samples)
        first, last = warm[4].get(role, 0), steady_end[4].get(role, 0)
        print(f"| {role} | {first:.0f} | {last:.0f} | {last - first:+.0f} | {peak:.0f} | "
              f"{end[4][role]:.0f} |")
    print("\nRSS (MiB) over time: " + ", ".join(sorted(end[4])))
    for s in samples[::4] + [end]:
        rss = " ".join(f"{s[4].get(r, 0):6.0f}" for r in sorted(end[4]))
        print(f"  {s[0]:6.0f} s {s[1]:>8}: {rss}   KV blocks {s[2]}, tracked {s[3]}")
    steady_blocks = [s[2] for s in samples if s[1] == "steady"]
    print(f"\nKV blocks in use during steady load: max {max(steady_blocks)}, "
          f"at the end (idle): {end[2]}; tracked requests at the end: {end[3]}")
    others = {k: v for c in outcomes.values() for k, v in c.items()
              if k not in ("ok", "cancelled", "RESOURCE_EXHAUSTED", "HTTP 429")}
    if others:
        print(f"other outcomes: {others}")
    sys.exit(0 if not others and end[2] == 0 and end[3] == 0 else 1)


if __name__ == "__main__":
    main()
