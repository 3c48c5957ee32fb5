"""How long `add_request` and `abort` take while a batch-32 decode step runs, side by side with
the old design (adds and aborts took the lock the step holds for its whole forward pass).

    python -m bench.admission                   # CPU, fp32, `small` random checkpoint
    python -m bench.admission --preset tiny --calls 50

A background thread steps the engine over `--batch` running requests (prompt 128, endless
decode). The main thread meanwhile adds a request and aborts it, `--calls` times, spaced at
random within a step, and times each call: "queued" is the engine as it is (adds and aborts are
queued and applied at the step boundary), "locked" holds the step lock around the same call, as
the engine did before. Prints medians and p99s against the median step time.
"""
from __future__ import annotations

import argparse
import functools
import logging
import random
import statistics
import threading
import time

import torch

from model.engine import Engine, SamplingParams
from model.random_checkpoint import cached_random_checkpoint

log = logging.getLogger("bench.admission")


def keep_stepping(engine: Engine, stop: threading.Event, step_times: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)


def time_calls(engine: Engine, calls: int, locked: bool,
               spacing_s: float) -> dict[str, list[float]]:
    rng, params = random.Random(0), SamplingParams(max_tokens=8)
    prompt = [1] + [1000 + i for i in range(31)]
    times: dict[str, list[float]] = {"add_request": [], "abort": []}
    for _ in range(calls):
        time.sleep(rng.uniform(0, spacing_s))
        rid = timed(times["add_request"], functools.partial(engine.add_request, prompt, params),
                    engine, locked)
        time.sleep(rng.uniform(0, spacing_s))
        timed(times["abort"], functools.partial(engine.abort, rid), engine, locked)
    return times


def timed(bucket: list[float], call, engine: Engine, locked: bool):
    start = time.perf_counter()
    if locked:                       # the old design: wait for the step's lock
        with engine.step_lock:
            result = call()
    else:
        result = call()
    bucket.append(time.perf_counter() - start)
    return result


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(cached_random_checkpoint(args.preset))
    rng = random.Random(1)
    for _ in range(args.batch):
        engine.add_request([1] + [rng.randrange(259, 32000) for _ in range(127)],
                           SamplingParams(max_tokens=engine.max_model_len - 128, ignore_eos=True))
    # prefill first: time decode steps only
    while any(r.num_computed < len(r.prompt_ids)
              for r in [*engine.scheduler.waiting, *engine.scheduler.running]):
        engine.step()
    stop, step_times = threading.Event(), []
    stepper = threading.Thread(target=keep_stepping, args=(engine, stop, step_times))
    stepper.start()
    try:
        time.sleep(1.0)
        spacing = statistics.median(step_times)
        results = {mode: time_calls(engine, args.calls, mode == "locked", spacing)
                   for mode in ("queued", "locked")}
    finally:
        stop.set()
        stepper.join()
    step_ms = statistics.median(step_times) * 1e3
    print(f"\n{args.preset}, batch {args.batch} decoding, {args.calls} calls each; "
          f"median step {step_ms:.1f} ms\n")
    print("| call | design | median ms | p99 ms | p99 / step |")
    print("|---|---|---|---|---|")
    for name in ("add_request", "abort"):
        for mode, times in results.items():
            values = times[name]
            print(f"| {name} | {mode} | {statistics.median(values) * 1e3:.2f} | "
                  f"{p99(values) * 1e3:.2f} | {p99(values) * 1e3 / step_ms:.2f} |")


if __name__ == "__main__":
    main()
