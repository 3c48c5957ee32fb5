"""Expert-parallel dispatch on Ray vs the in-process engine, side by side in one run.

    python -m bench.dispatch            # CPU, fp32, `small` random checkpoint, local Ray
    python -m bench.dispatch --quick
    python -m bench.dispatch --device cuda --gpu-share 0.1   # frontend + 8 experts on one GPU

Prints medians of --runs runs, for each configuration (--configs TRANSPORT:MICRO_BATCHES,...;
default the ZeroMQ channel with 1 and 2 micro-batches, and Ray object refs):
  * one layer's dispatch round trip (us) for batch sizes 1, 8, 32, 64, 128, split into
    routing (the router matmul + top-k), dispatch (grouping rows by expert), transport (there
    and back, minus expert compute), expert compute (inside the actors; the slowest actor's),
    combine (un-sort and weighted sum);
  * decode tokens/s of RayEngine vs the in-process Engine at batch 8, 32, 64 (prompt 128,
    64 new tokens; decode = total time minus the time to the first token).
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import time

import ray
import torch

from actors import RayEngine
from model.engine import Engine, SamplingParams
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.dispatch")
PHASES = ("routing", "dispatch", "transport", "compute", "combine", "total")


def decode_tps(engine, batch: int, prompt_len: int, new_tokens: int, runs: int,
               seed: int = 0) -> float:
    """Median decode tokens/s: (batch * (new - 1)) / (time(full) - time(first token))."""
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 32000) for _ in range(prompt_len - 1)] for _ in range(batch)]
    full = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        engine.generate(prompts, first)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        engine.generate(prompts, full)
        total = time.perf_counter() - t
        rates.append(batch * (new_tokens - 1) / max(total - ttft, 1e-9))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-share", type=float, default=0.1, help="GPU fraction per actor on CUDA")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30, help="layer calls per dispatch measurement")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", default="channel:1,channel:2,object_refs:1")
    ap.add_argument("--experts-per-actor", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of the in-process engine and of the frontend")
    ap.add_argument("--actor-threads", type=int, default=1,
                    help="torch threads per expert actor")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs = 1 if args.quick else args.runs
    torch.set_num_threads(args.threads)
    path = cached_random_checkpoint("small")
    ray.init(address="local", logging_level=logging.WARNING)
    gpu = args.device.startswith("cuda")
    resources = {"CPU": 0.01, "GPU": args.gpu_share} if gpu else {"CPU": 0.01}
    dispatch, ours = {}, {}
    batches = (8, 32, 64)
    for config in args.configs.split(","):
        transport, micro_batches = config.split(":")
        dist = RayEngine.from_pretrained(path, device=args.device, expert_resources=resources,
                                         frontend_resources=resources,
                                         frontend_threads=args.threads,
                                         expert_threads=args.actor_threads,
                                         transport=transport,
                                         experts_per_actor=args.experts_per_actor,
                                         engine_args={"micro_batches": int(micro_batches)})
        transport = f"{transport}, {micro_batches} micro-batch(es)"
        for batch in (1, 8, 32, 64, 128) if micro_batches == "1" else ():
            samples = [ray.get(dist.frontend.profile_dispatch.remote(batch, args.repeats))
                       for _ in range(runs)]
            dispatch[transport, batch] = {k: statistics.median(s[k] for s in samples)
                                          for k in PHASES}
            log.info("%s dispatch batch %d: %.0f us", transport, batch,
                     dispatch[transport, batch]["total"] * 1e6)
        ours.update({(transport, b): decode_tps(dist, b, 128, 64, runs) for b in batches})
        dist.shutdown()
    local = Engine.from_pretrained(path, device=args.device)
    base = {b: decode_tps(local, b, 128, 64, runs) for b in batches}
    ray.shutdown()

    lines = [f"device {args.device}, small checkpoint fp32, in-process {args.threads} threads, "
             f"actors {args.actor_threads} thread(s) each, {8 // args.experts_per_actor} expert "
             f"actors + frontend on one node; medians of {runs} runs",
             "", "| transport | batch | routing us | dispatch us | transport us "
             "| expert compute us | combine us | total us per layer |",
             "|---|---|---|---|---|---|---|---|"]
    for (transport, b), d in dispatch.items():
        lines.append(f"| {transport} | {b} | " + " | ".join(
            f"{(d[k] + (d['routing'] if k == 'total' else 0)) * 1e6:.0f}" for k in PHASES) + " |")
    lines += ["", "| transport | batch | RayEngine decode tok/s | in-process decode tok/s "
              "| distributed / in-process |", "|---|---|---|---|---|"]
    for (transport, b), tps in ours.items():
        lines.append(f"| {transport} | {b} | {tps:.1f} | {base[b]:.1f} | {tps / base[b]:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
