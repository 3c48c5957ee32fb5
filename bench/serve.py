"""The gRPC server under concurrent clients vs the same workload in the in-process engine.

    python -m bench.serve            # small random checkpoint, fp32, local Ray + Serve
    python -m bench.serve --quick

For 1, 8 and 32 concurrent clients, each sending requests back to back (GenerateStream, greedy,
prompt ~100 tokens, 32 new tokens), prints requests/s, generated tokens/s, p50/p99 time to first
token and p50/p99 inter-token latency, for the server over gRPC, the same over the
OpenAI-compatible HTTP API (streaming chat completions; the prompt goes through the chat
template, so it is a few tokens longer) and the in-process Engine.stream with the same
concurrency, and the served / in-process tokens/s ratios; then how many cores each
process of the server kept busy at each level (where the served path's time goes).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import logging
import os
import random
import time
from pathlib import Path

import grpc
import openai
import ray
from ray import serve

from bench.loadgen import COMMON_WORDS as WORDS
from cluster.local import free_port
from deploy.app import build_app, serve_start_options
from model.engine import Engine, SamplingParams
from model.random_checkpoint import cached_random_checkpoint
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

log = logging.getLogger("bench.serve")


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(90)) for _ in range(n)]


def summarize(wall: float, ttfts: list[float], gaps: list[float], tokens: int,
              requests: int) -> dict:
    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] if xs else float("nan")
    return {"req/s": requests / wall, "tok/s": tokens / wall, "ttft p50": q(ttfts, .5),
            "ttft p99": q(ttfts, .99), "itl p50": q(gaps, .5), "itl p99": q(gaps, .99)}


def run_grpc(stub, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    ttfts, gaps, tokens = [], [], [0]

    def one(text):
        start = last = time.perf_counter()
        first = True
        n = 0
        for part in stub.GenerateStream(pb.GenerateRequest(prompt=text, max_tokens=max_tokens,
                                                           temperature=0.0), timeout=600):
            now = time.perf_counter()
            (ttfts.append(now - start) if first else gaps.append(now - last))
            first, last, n = False, now, n + len(part.token_ids)
        return n

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens[0] = sum(pool.map(one, texts))
    return summarize(time.perf_counter() - start, ttfts, gaps, tokens[0], len(texts))


def run_http(client, model: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    """The same workload as streaming chat completions through the OpenAI-compatible API (the
    official `openai` client; a chunk is one server-sent event)."""
    ttfts, gaps, tokens = [], [], [0]

    def one(text):
        start = last = time.perf_counter()
        first = True
        n = 0
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"return_token_ids": True})
        for chunk in stream:
            if not chunk.choices:                       # the usage chunk
                continue
            now = time.perf_counter()
            (ttfts.append(now - start) if first else gaps.append(now - last))
            first, last, n = False, now, n + len(chunk.choices[0].token_ids or [])
        return n

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens[0] = sum(pool.map(one, texts))
    return summarize(time.perf_counter() - start, ttfts, gaps, tokens[0], len(texts))


def run_local(engine: Engine, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ttfts, gaps, tokens = [], [], []

    async def one(text, gate):
        async with gate:
            start = last = time.perf_counter()
            first, n = True, 0
            async for chunk in engine.stream(text, params):
                now = time.perf_counter()
                (ttfts.append(now - start) if first else gaps.append(now - last))
                first, last, n = False, now, n + len(chunk.token_ids)
            tokens.append(n)

    async def main():
        gate = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(one(t, gate) for t in texts))

    start = time.perf_counter()
    asyncio.run(main())
    return summarize(time.perf_counter() - start, ttfts, gaps, sum(tokens), len(texts))


def processes() -> dict[str, list[int]]:
    """Local pids by role: each live Ray actor by its class (Serve replicas by deployment),
    Ray's raylet and GCS, and this process (the clients)."""
    from ray.util.state import list_actors
    roles = collections.defaultdict(list, {"clients (this process)": [os.getpid()]})
    for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        roles[actor.class_name.split(":")[-1]].append(actor.pid)
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if (name := comm.read_text().strip()) in ("raylet", "gcs_server"):
                roles[name].append(int(comm.parent.name))
        except OSError:
            continue
    return roles


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (/proc/PID/stat; gone ones: 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer requests")
    ap.add_argument("--experts-per-actor", type=int, default=1)
    ap.add_argument("--frontend-threads", type=int, default=None,
                    help="torch threads of the engine replica (default: every core)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    preset = "tiny" if args.quick else args.preset
    path = cached_random_checkpoint(preset)
    levels = (1, 8, 32)
    per_level = {c: prompts(max(2 * c, 4) if not args.quick else c, seed=c) for c in levels}

    ray.init(address="local", logging_level=logging.WARNING)
    port, http_port = free_port(), free_port()
    serve.start(**serve_start_options(port, http_port))
    serve.run(build_app({"model": str(path), "experts_per_actor": args.experts_per_actor,
                         "frontend_threads": args.frontend_threads}),
              name="bench", route_prefix="/")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GeneratorStub(channel)
    list(stub.GenerateStream(pb.GenerateRequest(prompt="warm up", max_tokens=2), timeout=300))
    served, cores = {}, {}
    roles = processes()
    for c in levels:
        before = {role: cpu_seconds(pids) for role, pids in roles.items()}
        served[c] = run_grpc(stub, per_level[c], c, args.max_tokens)
        wall = len(per_level[c]) / served[c]["req/s"]
        cores[c] = {role: (cpu_seconds(pids) - before[role]) / wall for role, pids in roles.items()}
        log.info("grpc x%d: %s", c, served[c])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                           max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    over_http = {}
    for c in levels:
        over_http[c] = run_http(client, model, per_level[c], c, args.max_tokens)
        log.info("http x%d: %s", c, over_http[c])
    channel.close()
    serve.shutdown()
    ray.shutdown()

    engine = Engine.from_pretrained(path)
    run_local(engine, ["warm up"], 1, 2)
    local = {}
    for c in levels:
        local[c] = run_local(engine, per_level[c], c, args.max_tokens)
        log.info("in-process x%d: %s", c, local[c])

    lines = [f"{preset} checkpoint, fp32, greedy, {args.max_tokens} new tokens, ~100-token "
             f"prompts; server = Serve gRPC proxy -> gateway -> engine replica (the frontend, "
             f"{args.frontend_threads or 'all'} threads) -> {8 // args.experts_per_actor} expert "
             "actors (1 thread each); OpenAI HTTP = Serve's HTTP proxy -> the same gateway "
             "(streaming chat completions, the `openai` client); in-process = Engine.stream "
             "(2 threads); the cores table covers the gRPC run", "",
             "| clients | path | req/s | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
             "| served / in-process tok/s |",
             "|---|---|---|---|---|---|---|"]
    for c in levels:
        for name, r in (("gRPC server", served[c]), ("OpenAI HTTP, streaming chat", over_http[c]),
                        ("in-process", local[c])):
            ratio = f"{r['tok/s'] / local[c]['tok/s']:.2f}" if name != "in-process" else ""
            lines.append(f"| {c} | {name} | {r['req/s']:.2f} | {r['tok/s']:.1f} | "
                         f"{r['ttft p50'] * 1e3:.0f} / {r['ttft p99'] * 1e3:.0f} | "
                         f"{r['itl p50'] * 1e3:.0f} / {r['itl p99'] * 1e3:.0f} | {ratio} |")
    lines += ["",
              "Cores busy per process while serving (CPU seconds / wall seconds, from /proc):",
              "",
              "| process | " + " | ".join(f"{c} clients" for c in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for role in sorted(roles, key=lambda r: -cores[levels[-1]][r]):
        lines.append(f"| {role} ({len(roles[role])}) | "
                     + " | ".join(f"{cores[c][role]:.2f}" for c in levels) + " |")
    lines.append("| all of the above | "
                 + " | ".join(f"{sum(cores[c].values()):.2f}" for c in levels) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
