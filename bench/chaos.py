"""Chaos run: under steady streaming load, SIGKILL in turn a random expert actor, the engine
replica (the frontend), a gateway replica, and Serve's proxy (its ProxyActor: the gRPC and HTTP
ports; Serve restarts it); tally requests lost, outputs that differ from an undisturbed run,
and the longest stall a client saw.

    python -m bench.chaos                  # 2 rounds per target, 32 clients, tiny model
    python -m bench.chaos --rounds 5 --clients 64
    python -m bench.chaos --engine-replicas 2      # a killed engine's requests move at once

A local 4-node Ray cluster (cluster/local.py), the demo `tiny` checkpoint, one engine replica
(`--engine-replicas`) with 8 expert actors each and two gateway replicas. With one engine
replica, its clients wait for Serve to restart it (the longest stall); with two, the gateway
resumes them on the other at once. Each round starts `--clients` streaming requests
(bench/loadgen.py: half gRPC, half OpenAI HTTP, greedy and seeded, some with stop strings),
kills the target once every client has its first tokens, and waits for all to end; clients
retry a retryable end (UNAVAILABLE, HTTP 503, a cut stream) from the start, as a client
should. The expected output of each request is the in-process engine's, run alone. Goal: 0
lost and 0 wrong for every target; a gateway kill only makes its own clients retry.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import time

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from actors.options import EngineOptions
from actors.serving.engine_server import EngineServer
from actors.serving.gateway import Gateway
from bench import loadgen
from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, free_port, local_cluster
from deploy.app import GRPC_SERVICER_FUNCTIONS
from model.checkpoint import WeightSource
from model.engine import Engine
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.chaos")
APP, MODEL = "chaos", "tiny"
TARGETS = ("none", "expert actor", "engine replica", "gateway replica", "grpc proxy")
RETRIES = {"grpc proxy": 8}     # ~17 s of client backoff: Serve restarts a proxy in a new process


def alive(class_name: str) -> list[dict]:
    return [a for a in ray._private.state.actors(actor_state_name="ALIVE").values()
            if a["ActorClassName"] == class_name]


def victim(target: str, rng: random.Random) -> dict | None:
    names = {"expert actor": "ExpertWorker", "engine replica": f"ServeReplica:{APP}:EngineServer",
             "gateway replica": f"ServeReplica:{APP}:Gateway", "grpc proxy": "ProxyActor"}
    return rng.choice(alive(names[target])) if target != "none" else None


def wait_healthy(http_url: str, gateways: int, experts: int, timeout_s: float = 180) -> None:
    """Until /health answers 200 and every gateway replica and expert actor is alive."""
    import urllib.request
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{http_url}/health", timeout=10) as resp:
                if (resp.status == 200 and len(alive(f"ServeReplica:{APP}:Gateway")) == gateways
                        and len(alive("ExpertWorker")) == experts):
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("the application did not become healthy again")


async def one_round(target: str, jobs, want, grpc_address: str, http_url: str,
                    rng: random.Random) -> loadgen.Tally:
    task = asyncio.ensure_future(loadgen.run_jobs(jobs, grpc_address, http_url, MODEL,
                                                  retries=RETRIES.get(target, 3)))
    await asyncio.sleep(rng.uniform(1.0, 2.5))          # mid-stream for most clients
    killed = victim(target, rng)
    if killed is not None:
        os.kill(killed["Pid"], signal.SIGKILL)
        log.info("killed %s (pid %d)", target, killed["Pid"])
    return loadgen.check(jobs, await task, want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per target")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-replicas", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rng = random.Random(args.seed)
    path = cached_random_checkpoint("tiny")
    reference = Engine.from_pretrained(path)
    with local_cluster(expert_nodes=3, expert_slots=6):
        grpc_port, http_port = free_port(), free_port()
        serve.start(proxy_location="HeadOnly", http_options={"port": http_port},
                    grpc_options=gRPCOptions(port=grpc_port,
                                             grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
        # the head offers one `frontend` slot: more replicas than that go anywhere
        options = EngineOptions(expert_resources=EXPERT_SLOT, frontend_threads=1, expert_threads=1,
                                frontend_resources=FRONTEND_SLOT if args.engine_replicas == 1
                                else {"CPU": 0.01})
        engine = EngineServer.options(num_replicas=args.engine_replicas,
                                      ray_actor_options=options.ray_actor_options()).bind(
            WeightSource(path=str(path)), options)
        serve.run(Gateway.options(num_replicas=2).bind(engine, str(path), MODEL), name=APP,
                  route_prefix="/")
        grpc_address, http_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
        rows = []
        for rnd in range(args.rounds):
            for target in TARGETS:
                jobs = loadgen.make_jobs(args.clients, seed=rng.randrange(2**31), cancel_every=0,
                                         max_tokens=(24, 64))
                want = loadgen.expected_outputs(reference, jobs)
                wait_healthy(http_url, gateways=2, experts=8 * args.engine_replicas)
                started = time.monotonic()
                tally = asyncio.run(one_round(target, jobs, want, grpc_address, http_url, rng))
                rows.append((target, tally, time.monotonic() - started))
                log.info("round %d, %s: %s", rnd + 1, target, tally)
        serve.shutdown()
    print(f"\nchaos: {args.engine_replicas} engine replica(s), 2 gateways; {args.clients} "
          f"streaming clients a round (gRPC + HTTP, greedy + seeded), {args.rounds} round(s) per "
          "target; clients retry UNAVAILABLE / 503 / a cut stream")
    print("| killed | requests | exact | lost | wrong | retried by the client | longest stall s "
          "| round s |")
    print("|---|---|---|---|---|---|---|---|")
    for target in TARGETS:
        mine = [(t, s) for name, t, s in rows if name == target]
        total = {f: sum(getattr(t, f) for t, _ in mine)
                 for f in ("jobs", "completed", "lost", "wrong", "retried")}
        print(f"| {target} | {total['jobs']} | {total['completed']} | {total['lost']} | "
              f"{total['wrong']} | {total['retried']} | {max(t.max_gap_s for t, _ in mine):.1f} | "
              f"{max(s for _, s in mine):.1f} |")
    errors = {k: v for _, t, _ in rows for k, v in t.errors.items()}
    if errors:
        print(f"errors of lost requests: {errors}")
    sys.exit(0 if all(t.ok for _, t, _ in rows) else 1)


if __name__ == "__main__":
    main()
