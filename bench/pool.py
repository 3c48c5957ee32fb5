"""A shared pool of expert actors vs a pool per engine replica (issue 24, `expert_pool`): the
expert actors' memory with 1, 2 and 3 engine replicas; the throughput of 2 engine replicas
sharing one pool vs 2 with a pool each, and how often the shared actors merged the calls of
several frontends; then the paper estimate for Mixtral-8x7B on H100s (bench/pool_estimate.py).

    python -m bench.pool                         # tiny checkpoint, both pools, 1-3 replicas
    python -m bench.pool --replicas 1,2 --clients 16 --rounds 2
    python -m bench.pool --paper                 # the H100 estimate only (no Ray)

A local 4-node Ray cluster (cluster/local.py: a head and 3 expert nodes, all on this machine's
cores) and the Serve application as bench/chaos.py builds it: Serve's proxy -> one gateway ->
N engine replicas (1 torch thread each, on the head) -> 8 expert actors of 1 thread each in
all (`shared`) or per replica (`per_replica`). Each (pool, N) is deployed afresh and measured
once ready: the resident bytes of every expert actor's process (RSS, and PSS, which counts a
page that k processes share 1/k in each; /proc/PID/smaps_rollup) and the bytes of expert
weights they hold. With N = `--throughput-replicas`, `--rounds` rounds of `--clients` streaming
requests at once (bench/loadgen.py: half gRPC, half OpenAI HTTP, greedy and seeded; the same
jobs for both pools), each output checked against the in-process engine's: tokens/s over the
rounds, and the shared pool's MergeStats over them (actors/info.py: merged share =
merged_calls / calls; rows per GEMM = rows / computes; a replica's own actors are unnamed, and
Ray gives the bench no handle to them: "-").
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import statistics
import time

import ray
from ray import serve
from ray.util.state import list_actors

from actors.info import MergeStats
from actors.options import EXPERT_POOLS, EngineOptions
from actors.serving.gateway import Gateway
from bench import loadgen
from bench.machine import cpu_name, load_average
from bench.pool_estimate import estimate, table
from cluster.local import EXPERT_SLOT, HEAD_RESOURCE, free_port, local_cluster
from deploy.app import engine_deployment, serve_start_options
from model.checkpoint import WeightSource
from model.engine import Engine
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.pool")
APP, MODEL = "pool", "tiny"
ON_HEAD = {"CPU": 0.01, HEAD_RESOURCE: 1}       # every engine replica beside the proxy
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Memory:
    actors: int                     # expert actors alive
    rss: int                        # bytes, summed over their processes
    pss: int                        # bytes, the same with shared pages split between sharers
    weights: int                    # bytes of expert weights they hold


@dataclasses.dataclass(frozen=True)
class Throughput:
    requests: int
    exact: int                      # outputs equal to the in-process engine's
    tokens: int
    seconds: float                  # wall, summed over the rounds
    merges: MergeStats | None       # over the rounds, summed over actors; None: not reported
    us_per_row: float               # median over the actors of the measured compute per row

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def smaps_rollup(text: str) -> dict[str, int]:
    """/proc/PID/smaps_rollup's "Name: N kB" lines -> {name: bytes}."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) == 2 and fields[1] == "kB":
            out[name] = int(fields[0]) * 1024
    return out


def resident(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of local process `pid`; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            sizes = smaps_rollup(f.read())
    except OSError:
        return 0, 0
    return sizes.get("Rss", 0), sizes.get("Pss", 0)


def merges_between(before: MergeStats, after: MergeStats) -> MergeStats:
    """The counts of a run: cumulative `after` less `before` (the same actors)."""
    return MergeStats(*(getattr(after, f.name) - getattr(before, f.name)
                        for f in dataclasses.fields(MergeStats)))


def expert_actors() -> list:
    """The live ExpertWorker actors (ray.util.state records: actor_id, pid)."""
    return list_actors(filters=[("class_name", "=", "ExpertWorker"), ("state", "=", "ALIVE")],
                       detail=True, limit=1000)


def shared_actors() -> list:
    """Handles to the shared pool's expert actors (detached and named
    "mixtral-ep-pool:.../expert/..."); a replica's own pool's are unnamed: none."""
    return [ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("mixtral-ep-pool:") and "/expert/" in a["name"]]


def memory(expert_bytes: int) -> Memory:
    """The live expert actors' processes; each holds one expert of `expert_bytes`."""
    actors = expert_actors()
    sizes = [resident(a.pid) for a in actors]
    return Memory(len(actors), sum(r for r, _ in sizes), sum(p for _, p in sizes),
                  len(actors) * expert_bytes)


def merge_stats() -> MergeStats | None:
    """MergeStats summed over the shared pool's actors; None without one (Ray gives no handle
    to a replica's own, unnamed actors) or where ExpertWorker has no merge_stats."""
    handles = shared_actors()
    if not handles or not hasattr(handles[0], "merge_stats"):
        return None
    return MergeStats.merged(ray.get([h.merge_stats.remote() for h in handles]))


def expert_bytes(path) -> int:
    """Bytes of one expert's w1, w2, w3 over every layer in the checkpoint's dtype."""
    cfg = WeightSource(path=str(path)).model_config()
    return 3 * cfg.num_hidden_layers * cfg.hidden_size * cfg.intermediate_size * 4   # float32


def wait_for_experts(count: int, timeout_s: float = 120) -> None:
    """Until exactly `count` expert actors are alive (a deleted app's stop, a new one's start)."""
    deadline = time.monotonic() + timeout_s
    while (alive := len(expert_actors())) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{alive} expert actors alive after {timeout_s} s; want {count}")
        time.sleep(1)


def deploy(path, pool: str, replicas: int) -> None:
    options = EngineOptions(expert_resources=EXPERT_SLOT, frontend_resources=ON_HEAD,
                            frontend_threads=1, expert_threads=1, expert_pool=pool)
    engine = engine_deployment(WeightSource(path=str(path)), options, num_replicas=replicas)
    serve.run(Gateway.bind(engine, str(path), MODEL), name=APP, route_prefix="/")
    wait_for_experts(8 * (1 if pool == "shared" else replicas))


def throughput(rounds: list, addresses: tuple[str, str]) -> Throughput:
    """`rounds`: [(jobs, their expected ids)]; each round's jobs all at once."""
    warm = loadgen.make_jobs(4, seed=1, cancel_every=0, max_tokens=(4, 8))
    asyncio.run(loadgen.run_jobs(warm, *addresses, MODEL))
    before, seconds, tokens, exact, requests = merge_stats(), 0.0, 0, 0, 0
    for jobs, want in rounds:
        started = time.monotonic()
        results = asyncio.run(loadgen.run_jobs(jobs, *addresses, MODEL, retries=3))
        seconds += time.monotonic() - started
        tally = loadgen.check(jobs, results, want)
        requests, exact = requests + tally.jobs, exact + tally.completed
        tokens += sum(len(r.ids) for r in results)
    after = merge_stats()
    load = serve.get_deployment_handle("EngineServer", APP).expert_load.remote().result()
    speeds = [a.seconds_per_row for a in load.actors if a.seconds_per_row]
    return Throughput(requests, exact, tokens, seconds,
                      merges_between(before, after) if after is not None else None,
                      1e6 * statistics.median(speeds) if speeds else float("nan"))


def measure(args, path, rounds) -> tuple[dict, dict]:
    """-> ({(pool, N): Memory}, {pool: Throughput at N = args.throughput_replicas})."""
    memories, speeds = {}, {}
    with local_cluster(expert_nodes=3, expert_slots=8 * max(args.replicas) // 3 + 1):
        grpc_port, http_port = free_port(), free_port()
        serve.start(**serve_start_options(grpc_port, http_port))
        addresses = (f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
        for pool in args.pools:
            for n in sorted(set(args.replicas) | {args.throughput_replicas}):
                started = time.monotonic()
                deploy(path, pool, n)
                log.info("%s pool, %d engine replicas: ready in %.0f s", pool, n,
                         time.monotonic() - started)
                if n in args.replicas:
                    memories[pool, n] = memory(expert_bytes(path))
                    log.info("memory: %s", memories[pool, n])
                if n == args.throughput_replicas and rounds:
                    speeds[pool] = throughput(rounds, addresses)
                    log.info("throughput: %s", speeds[pool])
                serve.delete(APP)
                wait_for_experts(0)
        serve.shutdown()
    return memories, speeds


def memory_table(memories: dict) -> list[str]:
    lines = ["| engine replicas | pool | expert actors | RSS MiB | PSS MiB | weights MiB | "
             "RSS / 1 replica's |", "|---|---|---|---|---|---|---|"]
    for (pool, n), m in sorted(memories.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        one = memories.get((pool, 1))
        ratio = f"{m.rss / one.rss:.2f}" if one else ""
        lines.append(f"| {n} | {pool} | {m.actors} | {m.rss / MIB:.0f} | {m.pss / MIB:.0f} | "
                     f"{m.weights / MIB:.2f} | {ratio} |")
    return lines


def throughput_table(speeds: dict, replicas: int) -> list[str]:
    lines = [f"| pool ({replicas} engine replicas) | requests | exact | tokens | tok/s | "
             "/ per_replica | calls | GEMMs | merged share | rows per GEMM | us per row |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = speeds.get("per_replica")
    for pool, t in speeds.items():
        ratio = f"{t.tokens_per_s / base.tokens_per_s:.2f}" if base else ""
        m = t.merges
        merged = (f"{m.calls} | {m.computes} | {m.merged_calls / max(m.calls, 1):.1%} | "
                  f"{m.rows_per_compute:.1f}" if m else "- | - | - | -")
        lines.append(f"| {pool} | {t.requests} | {t.exact} | {t.tokens} | "
                     f"{t.tokens_per_s:.1f} | {ratio} | {merged} | {t.us_per_row:.1f} |")
    return lines


def parse_counts(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3]; ArgumentTypeError for a count below 1."""
    counts = [int(t) for t in text.split(",") if t.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"engine replica counts must be >= 1; got {text!r}")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=lambda t: [p for p in EXPERT_POOLS if p in t.split(",")],
                    default=["per_replica", "shared"], help="comma-separated: shared,per_replica")
    ap.add_argument("--replicas", type=parse_counts, default=[1, 2, 3],
                    help="engine replica counts whose expert memory is measured")
    ap.add_argument("--throughput-replicas", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (0: none)")
    ap.add_argument("--clients", type=int, default=32, help="streaming requests a round")
    ap.add_argument("--max-tokens", type=int, nargs=2, default=(32, 64))
    ap.add_argument("--paper", action="store_true", help="only the H100 estimate, no Ray")
    ap.add_argument("--batch", type=int, default=64, help="estimate: sequences per frontend")
    ap.add_argument("--context", type=int, default=2048, help="estimate: cached tokens each")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    paper = table(estimate(batch=args.batch, context=args.context))
    if not args.paper:
        path = cached_random_checkpoint(MODEL)
        reference = Engine.from_pretrained(path)
        rounds = []
        for r in range(args.rounds):
            jobs = loadgen.make_jobs(args.clients, seed=r, cancel_every=0,
                                     max_tokens=tuple(args.max_tokens))
            rounds.append((jobs, loadgen.expected_outputs(reference, jobs)))
        memories, speeds = measure(args, path, rounds)
        print(f"\npool: {MODEL} checkpoint, {cpu_name()}, {load_average()} at the end; "
              "1 gateway, engine replicas of 1 torch thread, expert actors of 1 thread\n")
        print("\n".join(memory_table(memories)))
        if speeds:
            print(f"\n{args.rounds} rounds of {args.clients} streaming requests at once "
                  f"({args.max_tokens[0]}-{args.max_tokens[1]} new tokens, gRPC + HTTP, greedy "
                  "+ seeded):\n")
            print("\n".join(throughput_table(speeds, args.throughput_replicas)))
    print(f"\nMixtral-8x7B on H100s (bench/pool_estimate.py), {args.batch} sequences of "
          f"{args.context} tokens per frontend:\n\n{paper}")


if __name__ == "__main__":
    main()
