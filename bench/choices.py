"""One request with n = 8 choices vs 8 separate requests of one prompt, side by side in a run.

    python -m bench.choices                            # CPU, fp32, `small` random weights
    python -m bench.choices --rounds 1 --prompt-len 128    # quicker
    python -m bench.choices --device cuda              # GPU, bf16

The engine prefills an n-choice request's prompt once, then forks its n sequences, which share
the prompt's KV blocks (model/scheduler.py: `fork`; a sequence copies a shared block before it
writes into it). One side is one seeded request with n = 8; the other adds 8 separate
requests of the same prompt at once, request i seeded `choice_seed(seed, i)` as choice i is,
so both sides must draw the same tokens. Per side, medians over --rounds rounds (the sides
alternate which goes first, after a warm-up of each with the same prompt, n = 2 and 2 tokens):
  * wall time from adding the requests until the last token, generated tokens per second, and
    this process's CPU time over the same span; also the fastest round's tokens/s, the least
    disturbed by other work on a shared machine;
  * time until every choice has its first token;
  * prompt tokens computed (prefill work, recomputation after a preemption included) and all
    tokens computed, counted from what the scheduler hands each step;
  * peak KV blocks in use (blocks are only taken when a step is scheduled, so the count is
    read right after each `schedule()`: the exact peak);
and whether the two sides' tokens are identical (they must be; an error is logged if not).
The default prompt (500 tokens) does not fill its last 16-token block, so each choice copies
that shared block on its first write, as real prompts make it. No timed assertion: the figures
go to docs/benchmarks/choices.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import statistics
import time

import torch

from bench.machine import add_device_arguments, compute_dtype, cpu_name, load_average
from model.engine import Engine
from model.sampling import SamplingParams, choice_seed
from model.scheduler import Request, Scheduler

log = logging.getLogger("bench.choices")

@dataclasses.dataclass
class Result:
    seconds: float                        # from adding the requests to the last token
    cpu_seconds: float                    # this process's CPU time over the same span
    first_all: float                      # s until every choice has its first token
    prompt_tokens: int                    # prompt positions computed (prefill work)
    computed: int                         # all positions computed
    peak_blocks: int                      # KV blocks in use at most
    tokens: dict[int, list[int]]          # choice -> its generated token ids


class ScheduleProbe:
    """Wraps an engine's `Scheduler.schedule` to count the prompt and all tokens each step
    computes and the KV blocks in use right after scheduling (a benchmark's probe: the
    engine's behaviour is unchanged). `reset(in_use)` starts a count with `in_use` blocks
    already held by others."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler, self._schedule = scheduler, scheduler.schedule
        scheduler.schedule = self
        self.reset()

    def reset(self) -> None:
        self.prompt_tokens = self.computed = self.peak_blocks = 0
        self._free_at_start = self._scheduler.allocator.num_free

    def __call__(self) -> list[tuple[Request, int]]:
        scheduled = self._schedule()
        for req, n in scheduled:
            end = min(req.num_computed + n, len(req.prompt_ids))
            self.prompt_tokens += max(0, end - req.num_computed)
            self.computed += n
        in_use = self._free_at_start - self._scheduler.allocator.num_free
        self.peak_blocks = max(self.peak_blocks, in_use)
        return scheduled


def run_side(engine: Engine, probe: ScheduleProbe,
             requests: list[tuple[list[int], SamplingParams]]) -> Result:
    """Add `requests` at once and step the engine until they finish. Choice c of request r
    is key r + c of the result's tokens (so choice i of one request and request i line up)."""
    probe.reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    rids = {engine.add_request(prompt, params): r for r, (prompt, params) in enumerate(requests)}
    tokens: dict[int, list[int]] = {}
    first: dict[int, float] = {}
    while engine.has_unfinished():
        chunks = engine.step()
        now = time.perf_counter()
        for chunk in chunks:
            key = rids[chunk.request_id] + chunk.index
            tokens.setdefault(key, []).extend(chunk.token_ids)
            if chunk.token_ids:
                first.setdefault(key, now)
    end, cpu = time.perf_counter(), time.process_time() - cpu_start
    for rid in rids:
        engine.abort(rid)                  # lets go of the finished requests' state
    return Result(end - start, cpu, max(first.values()) - start, probe.prompt_tokens,
                  probe.computed, probe.peak_blocks, tokens)


def sides(prompt: list[int], n: int, new_tokens: int, temperature: float,
          seed: int) -> dict[str, list[tuple[list[int], SamplingParams]]]:
    """The two sides' requests by label: one with n choices first, then n separate ones seeded
    as the choices are."""
    def params(choices: int, request_seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=new_tokens, temperature=temperature, seed=request_seed,
                              ignore_eos=True, n=choices)
    return {f"one request, n = {n}": [(prompt, params(n, seed))],
            f"{n} separate requests": [(prompt, params(1, choice_seed(seed, i))) for i in range(n)]}


def measure(engine: Engine, requests: dict, rounds: int) -> dict[str, list[Result]]:
    """`rounds` runs of each side, alternating which side goes first."""
    probe = ScheduleProbe(engine.scheduler)
    results: dict[str, list[Result]] = {side: [] for side in requests}
    for r in range(rounds):
        order = list(requests) if r % 2 == 0 else list(reversed(requests))
        for side in order:
            results[side].append(run_side(engine, probe, requests[side]))
            last = results[side][-1]
            log.info("round %d, %s: %.2f s, CPU %.2f s", r + 1, side, last.seconds,
                     last.cpu_seconds)
    return results


def check_identical(results: dict[str, list[Result]]) -> bool:
    """Whether every run of both sides drew the same tokens for every choice."""
    runs = [res.tokens for side in results.values() for res in side]
    same = all(run == runs[0] for run in runs)
    if not same:
        log.error("the two sides drew different tokens: n choices must equal separate requests "
                  "seeded choice_seed(seed, i)")
    return same


def report(results: dict[str, list[Result]], identical: bool, header: str) -> str:
    def med(side: str, key) -> float:
        return statistics.median(key(r) for r in results[side])

    def tps(r: Result) -> float:
        return sum(map(len, r.tokens.values())) / r.seconds

    def fastest(side: str) -> float:        # the least disturbed round, on a shared machine
        return max(map(tps, results[side]))

    lines = [header, "",
             "| side | wall s | CPU s | generated tok/s | fastest round tok/s "
             "| every first token s | prompt tokens computed | tokens computed | peak KV blocks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for side in results:
        lines.append(f"| {side} | {med(side, lambda r: r.seconds):.2f} | "
                     f"{med(side, lambda r: r.cpu_seconds):.2f} | {med(side, tps):.1f} | "
                     f"{fastest(side):.1f} | "
                     f"{med(side, lambda r: r.first_all):.2f} | "
                     f"{med(side, lambda r: r.prompt_tokens):.0f} | "
                     f"{med(side, lambda r: r.computed):.0f} | "
                     f"{med(side, lambda r: r.peak_blocks):.0f} |")
    a, b = results                         # the n-choice side first
    per_round = ", ".join(f"{rb.seconds / ra.seconds:.2f}x" for ra, rb in zip(results[a],
                                                                            results[b]))
    lines += ["", f"{a} / {b}: tokens/s {med(a, tps) / med(b, tps):.2f}x (fastest rounds "
              f"{fastest(a) / fastest(b):.2f}x), wall time "
              f"{med(a, lambda r: r.seconds) / med(b, lambda r: r.seconds):.2f}x, CPU time "
              f"{med(a, lambda r: r.cpu_seconds) / med(b, lambda r: r.cpu_seconds):.2f}x, "
              f"prompt tokens "
              f"{med(a, lambda r: r.prompt_tokens) / med(b, lambda r: r.prompt_tokens):.3f}x, "
              f"peak KV blocks "
              f"{med(a, lambda r: r.peak_blocks) / med(b, lambda r: r.peak_blocks):.2f}x",
              f"tokens/s {a} / {b} round by round: {per_round}",
              f"tokens identical on both sides, every round: {'yes' if identical else 'NO'}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(ap)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=8, help="choices, and separate requests")
    ap.add_argument("--prompt-len", type=int, default=500)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-mib", type=int, default=256, help="KV cache size, MiB")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    dtype = compute_dtype(args)
    load_before = load_average()
    # prefix caching off: this compares forking n choices with n requests that each compute
    # the prompt (with it on, every request after the first would take the prompt cached)
    engine = Engine.from_config(args.preset, dtype=dtype, device=args.device,
                                max_model_len=args.prompt_len + args.new_tokens,
                                kv_cache_memory=args.kv_mib * 2**20, enable_prefix_caching=False)
    rng = random.Random(args.seed)
    prompt = [1] + [rng.randrange(3, engine.cfg.vocab_size) for _ in range(args.prompt_len - 1)]
    measure(engine, sides(prompt, 2, 2, args.temperature, args.seed), 1)     # warm-up
    results = measure(engine, sides(prompt, args.n, args.new_tokens, args.temperature,
                                    args.seed), args.rounds)
    header = (f"CPU: {cpu_name()}; device {args.device}, {dtype}, torch threads {args.threads}, "
              f"preset {args.preset}; prompt {args.prompt_len} tokens, {args.new_tokens} new "
              f"tokens per choice, n = {args.n}, temperature {args.temperature}, seed "
              f"{args.seed}; block size {engine.block_size}; medians of {args.rounds} rounds; "
              f"{load_before} before, {load_average()} after")
    print(report(results, check_identical(results), header))


if __name__ == "__main__":
    main()
