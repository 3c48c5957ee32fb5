"""Chaos run: under steady streaming load, SIGKILL in turn a random expert actor, the engine
replica (the frontend), a gateway replica, and Serve's proxy (its ProxyActor: the gRPC and HTTP
ports; Serve restarts it); tally requests lost, outputs that differ from an undisturbed run,
and the longest stall a client saw. Last, Ctrl-C (SIGINT) the whole server mid-load and sort
how each stream ended.

    python -m bench.chaos                  # 2 rounds per target, 32 clients, tiny model
    python -m bench.chaos --rounds 5 --clients 64
    python -m bench.chaos --engine-replicas 2      # a killed engine's requests move at once
    python -m bench.chaos --targets "server SIGINT,grpc proxy"
    python -m bench.chaos --targets "engine replica" --expert-pool per_replica   # today's pool

A local 4-node Ray cluster (cluster/local.py), the demo `tiny` checkpoint, one engine replica
(`--engine-replicas`) and two gateway replicas; the engine replicas share one pool of 8 expert
actors (`--expert-pool shared`, the default: its owner is the ExpertPoolServer replica, target
"pool owner") or each owns 8 (`per_replica`). With one engine replica, its clients wait for
Serve to restart it (the longest stall: with a shared pool only the frontend's own weights
load again; with its own pool, its expert actors too); with two, the gateway resumes them on
the other at once. Each round starts `--clients` streaming requests
(bench/loadgen.py: half gRPC, half OpenAI HTTP, greedy and seeded, some with stop strings),
kills the target once every client has its first tokens, and waits for all to end; clients
retry a retryable end (UNAVAILABLE, HTTP 503, a cut stream) from the start, as a client
should. The expected output of each request is the in-process engine's, run alone. Goal: 0
lost and 0 wrong for every target; a gateway kill only makes its own clients retry.

"server SIGINT" starts the server as an operator does, `python -m deploy` on a Ray of its own
(bench/launcher.py: one gateway, one engine replica, 8 expert actors,
`--graceful-shutdown-timeout-s` = `--grace-s`), after the cluster above is gone; each round
sends the same kind of load with longer outputs (24-400 tokens), Ctrl-Cs the launcher's
process group mid-load, and the clients do not retry (the server is going away). Each stream
must complete with the right output or end as a draining server ends it (docs/operations.md
"Shutdown and draining": an error event then `data: [DONE]`, UNAVAILABLE, or 503): counted
completed / drained / cut (any other end) / hung; goal: none cut, none hung, none wrong.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray import serve

from actors.options import EXPERT_POOLS, EngineOptions
from actors.serving.gateway import Gateway
from bench import loadgen
from bench.launcher import Launched
from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, free_port, local_cluster
from deploy.app import engine_deployment, serve_start_options
from model.checkpoint import WeightSource
from model.engine import Engine
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.chaos")
APP, MODEL = "chaos", "tiny"
KILLS = ("none", "expert actor", "engine replica", "pool owner", "gateway replica", "grpc proxy")
SIGINT = "server SIGINT"
TARGETS = (*KILLS, SIGINT)
# clients retry a dead proxy for ~65 s (Clients.run's backoff: 0.5 s more a try, at most 3 s):
# Serve restarts a proxy after 3 failed health checks 10 s apart, in a new process (~40 s here)
RETRIES = {"grpc proxy": 24}
KILL_AFTER_S = (1.0, 2.5)       # a round's kill comes this long after its clients start: mid-stream
SIGINT_MAX_TOKENS = (24, 400)   # some streams end within the grace, some run past it


def alive(class_name: str) -> list[dict]:
    return [a for a in ray._private.state.actors(actor_state_name="ALIVE").values()
            if a["ActorClassName"] == class_name]


def victim(target: str, rng: random.Random) -> dict | None:
    names = {"expert actor": "ExpertWorker", "engine replica": f"ServeReplica:{APP}:EngineServer",
             "pool owner": f"ServeReplica:{APP}:ExpertPoolServer",
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
    await asyncio.sleep(rng.uniform(*KILL_AFTER_S))
    killed = victim(target, rng)
    if killed is not None:
        os.kill(killed["Pid"], signal.SIGKILL)
        log.info("killed %s (pid %d)", target, killed["Pid"])
    return loadgen.check(jobs, await task, want)


def kill_rounds(args, targets: list[str], path, reference, rng: random.Random) -> list[tuple]:
    """`args.rounds` rounds of each of `targets` (KILLS) on a local cluster -> a row
    (target, Tally, round seconds) per round."""
    rows = []
    with local_cluster(expert_nodes=3, expert_slots=6):
        grpc_port, http_port = free_port(), free_port()
        serve.start(**serve_start_options(grpc_port, http_port))
        # the head offers one `frontend` slot: more replicas than that go anywhere
        options = EngineOptions(expert_resources=EXPERT_SLOT, frontend_threads=1, expert_threads=1,
                                frontend_resources=FRONTEND_SLOT if args.engine_replicas == 1
                                else {"CPU": 0.01}, expert_pool=args.expert_pool)
        experts = 8 * (1 if args.expert_pool == "shared" else args.engine_replicas)
        engine = engine_deployment(WeightSource(path=str(path)), options,
                                   num_replicas=args.engine_replicas)
        serve.run(Gateway.options(num_replicas=2).bind(engine, str(path), MODEL), name=APP,
                  route_prefix="/")
        grpc_address, http_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
        for rnd in range(args.rounds):
            for target in targets:
                jobs = loadgen.make_jobs(args.clients, seed=rng.randrange(2**31), cancel_every=0,
                                         max_tokens=(24, 64))
                want = loadgen.expected_outputs(reference, jobs)
                wait_healthy(http_url, gateways=2, experts=experts)
                started = time.monotonic()
                tally = asyncio.run(one_round(target, jobs, want, grpc_address, http_url, rng))
                rows.append((target, tally, time.monotonic() - started))
                log.info("round %d, %s: %s", rnd + 1, target, tally)
        serve.shutdown()
    return rows


async def sigint_round(server: Launched, jobs, want, grace_s: float,
                       rng: random.Random) -> tuple[loadgen.Endings, float | None]:
    """Load on `server`, Ctrl-C it mid-load -> (how the streams ended, seconds from the Ctrl-C
    until the launcher exited or None if it had not within grace + 60 s)."""
    hung_s = KILL_AFTER_S[1] + grace_s + 30            # a stream still open then has hung
    task = asyncio.ensure_future(loadgen.run_jobs(jobs, server.grpc_address, server.http_url,
                                                  MODEL, retries=0, timeout_s=hung_s))
    await asyncio.sleep(rng.uniform(*KILL_AFTER_S))
    log.info("Ctrl-C to the server (pid %d)", server.proc.pid)
    exit_s = await asyncio.to_thread(server.interrupt, grace_s + 60)
    return loadgen.check_endings(await task, want), exit_s


def sigint_rounds(args, path, reference, rng: random.Random) -> list[tuple]:
    """`args.rounds` rounds of SIGINT, each on a freshly launched server -> a row (Endings,
    exit seconds or None, Serve's "failed to shut down" lines, round seconds) per round."""
    rows = []
    for rnd in range(args.rounds):
        jobs = loadgen.make_jobs(args.clients, seed=rng.randrange(2**31), cancel_every=0,
                                 max_tokens=SIGINT_MAX_TOKENS)
        want = loadgen.expected_outputs(reference, jobs)
        with tempfile.TemporaryDirectory(prefix="chaos-sigint-") as tmp, \
                Launched(path, MODEL, args.grace_s, Path(tmp)) as server:
            started = time.monotonic()
            endings, exit_s = asyncio.run(sigint_round(server, jobs, want, args.grace_s, rng))
            console = server.log()
        failed = console.count("failed to shut down")
        rows.append((endings, exit_s, failed, time.monotonic() - started))
        log.info("round %d, %s: %s; exited after %s s", rnd + 1, SIGINT, endings, exit_s)
        if not endings.ok or exit_s is None or failed:
            log.warning("the server's console, last lines:\n%s", console[-4000:])
    return rows


def print_kills(args, rows: list[tuple]) -> None:
    print(f"\nchaos: {args.engine_replicas} engine replica(s), expert pool {args.expert_pool}, "
          f"2 gateways; {args.clients} "
          f"streaming clients a round (gRPC + HTTP, greedy + seeded), {args.rounds} round(s) per "
          "target; clients retry UNAVAILABLE / 503 / a cut stream")
    print("| killed | requests | exact | lost | wrong | retried by the client | longest stall s "
          "| round s |")
    print("|---|---|---|---|---|---|---|---|")
    for target in dict.fromkeys(name for name, _, _ in rows):
        mine = [(t, s) for name, t, s in rows if name == target]
        total = {f: sum(getattr(t, f) for t, _ in mine)
                 for f in ("jobs", "completed", "lost", "wrong", "retried")}
        print(f"| {target} | {total['jobs']} | {total['completed']} | {total['lost']} | "
              f"{total['wrong']} | {total['retried']} | {max(t.max_gap_s for t, _ in mine):.1f} | "
              f"{max(s for _, s in mine):.1f} |")
    errors = {k: v for _, t, _ in rows for k, v in t.errors.items()}
    if errors:
        print(f"errors of lost requests: {errors}")


def print_sigint(args, rows: list[tuple]) -> None:
    print(f"\n{SIGINT}: `python -m deploy`, 1 gateway, 1 engine replica, "
          f"--graceful-shutdown-timeout-s {args.grace_s:g}; {args.clients} streaming clients a "
          f"round ({SIGINT_MAX_TOKENS[0]}-{SIGINT_MAX_TOKENS[1]} tokens), Ctrl-C "
          f"{KILL_AFTER_S[0]:g}-{KILL_AFTER_S[1]:g} s in; clients do not retry")
    print("| round | requests | completed | drained | cut | hung | wrong | server exit s "
          "| 'failed to shut down' lines |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rnd, (e, exit_s, failed, _) in enumerate(rows, 1):
        print(f"| {rnd} | {e.jobs} | {e.completed} | {e.drained} | {e.cut} | {e.hung} | "
              f"{e.wrong} | {'-' if exit_s is None else f'{exit_s:.1f}'} | {failed} |")
    endings = {}
    for e, *_ in rows:
        for k, v in e.errors.items():
            endings[k] = endings.get(k, 0) + v
    if endings:
        print(f"endings other than completed: {endings}")


def parse_targets(text: str) -> list[str]:
    """"a,b" -> [a, b] in TARGETS' order; ValueError names an unknown target."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown or 'nothing'}; choose "
                                         f"from {', '.join(TARGETS)}")
    return [t for t in TARGETS if t in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per target")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-replicas", type=int, default=1)
    ap.add_argument("--expert-pool", choices=EXPERT_POOLS, default="shared",
                    help="one pool for every engine replica, or one each (actors/options.py)")
    ap.add_argument("--targets", type=parse_targets, default=list(TARGETS),
                    help="comma-separated, of: " + ", ".join(TARGETS) + " (default: all)")
    ap.add_argument("--grace-s", type=float, default=10.0,
                    help=f"{SIGINT}: the launched server's --graceful-shutdown-timeout-s")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)     # not a line per request
    rng = random.Random(args.seed)
    path = cached_random_checkpoint("tiny")
    reference = Engine.from_pretrained(path)
    kills = [t for t in args.targets if t in KILLS
             and (t != "pool owner" or args.expert_pool == "shared")]    # per_replica: none
    kill_rows = kill_rounds(args, kills, path, reference, rng) if kills else []
    sigint_rows = sigint_rounds(args, path, reference, rng) if SIGINT in args.targets else []
    if kill_rows:
        print_kills(args, kill_rows)
    if sigint_rows:
        print_sigint(args, sigint_rows)
    ok = (all(t.ok for _, t, _ in kill_rows)
          and all(e.ok and exit_s is not None and not failed
                  for e, exit_s, failed, _ in sigint_rows))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
