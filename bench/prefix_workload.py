"""bench/prefix.py's workload and how requests arrive, for any engine (standard library only:
vLLM's worker imports it from its own virtualenv).

    w = make_workload(system_tokens=1000, turn_tokens=50, requests=32, seed=0)
    w.prompts            # [system + turn_i]: every pair of prompts shares exactly `system`
    t = run_scenario(run_batch, w, "warm", new_tokens=16, counters=lambda: {"rows": ...})
    t.ttft, t.seconds, t.ids, t.cached, t.counted     # per request, and the counters' deltas

`run_batch(prompts, max_tokens) -> list[Sample]` runs prompts added all at once until each has
`max_tokens` greedy tokens; `step_batch` builds one from an engine's add / step (ours and vLLM's
alike). The scenarios, each timed from the first request added to the last token:
  * cold:       all requests at once; nothing of the system prompt was seen before: the first
                request admitted computes it, and the others of its batch share its blocks as
                soon as the step that fills them is scheduled (ours and vLLM's alike);
  * warm:       a warm-up request (system prompt + a turn of its own, 1 token) runs first,
                untimed; then all requests at once (a chat server's steady state);
  * one-by-one: after the same warm-up, one request at a time, each added when the previous
                one finished (a single client's latency; no queueing).
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable

SCENARIOS = ("cold", "warm", "one-by-one")
BOS = 1


@dataclasses.dataclass(frozen=True)
class Workload:
    system: list[int]           # the shared system prompt, BOS first
    turns: list[list[int]]      # one distinct user turn per request
    warmup: list[int]           # the warm-up request's own turn (none of `turns`)

    @property
    def prompts(self) -> list[list[int]]:
        return [self.system + turn for turn in self.turns]


def make_workload(system_tokens: int, turn_tokens: int, requests: int, seed: int,
                  vocab: int = 32000) -> Workload:
    """Random ids in [3, vocab) seeded by `seed`; each turn (and the warm-up's) starts with an
    id no other turn starts with, so two prompts share exactly the system prompt.
    ValueError naming the field if a length is < 1 or the first ids cannot be distinct."""
    for name, value in (("system_tokens", system_tokens), ("turn_tokens", turn_tokens),
                        ("requests", requests)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if requests + 1 > vocab - 3:
        raise ValueError(f"requests must be <= {vocab - 4} (distinct first ids), got {requests}")
    rng = random.Random(seed)
    system = [BOS] + [rng.randrange(3, vocab) for _ in range(system_tokens - 1)]
    firsts = rng.sample(range(3, vocab), requests + 1)
    turns = [[first] + [rng.randrange(3, vocab) for _ in range(turn_tokens - 1)]
             for first in firsts]
    return Workload(system, turns[:-1], turns[-1])


@dataclasses.dataclass
class Sample:
    ttft: float                 # s from the request's add to its first token
    ids: list[int]              # its generated token ids
    cached: int                 # prompt tokens the engine took from its prefix cache


@dataclasses.dataclass
class Timing:
    """One scenario on one engine: per request (in the workload's order) and in all."""
    ttft: list[float]           # s
    seconds: float              # from the first request added to the last token
    ids: list[list[int]]
    cached: list[int]
    prompt_tokens: int
    counted: dict[str, int]     # the counters' increase over the timed part

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the scenario."""
        return sum(map(len, self.ids)) / self.seconds


RunBatch = Callable[[list[list[int]], int], list[Sample]]
# one engine step -> (request id, new token ids, finished, cached prompt tokens) per request
# that produced something
StepOutputs = Iterable[tuple[str, list[int], bool, int]]


def step_batch(add: Callable[[list[int], int], str], step: Callable[[], StepOutputs]
               ) -> RunBatch:
    """A RunBatch over an engine driven step by step: `add(prompt, max_tokens) -> request id`
    (greedy), `step()` as StepOutputs. Every request must finish (ignore_eos, max_tokens)."""
    def run(prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        start = time.perf_counter()
        rids = [add(p, max_tokens) for p in prompts]
        samples = {rid: Sample(float("nan"), [], 0) for rid in rids}
        unfinished = set(rids)
        while unfinished:
            outputs = list(step())
            now = time.perf_counter() - start
            for rid, ids, finished, cached in outputs:
                sample = samples[rid]
                if ids and not sample.ids:
                    sample.ttft = now
                sample.ids += ids
                sample.cached = cached
                if finished:
                    unfinished.discard(rid)
        return [samples[rid] for rid in rids]
    return run


def run_scenario(run_batch: RunBatch, workload: Workload, scenario: str, new_tokens: int,
                 counters: Callable[[], dict[str, int]] = dict) -> Timing:
    """Run `scenario` (one of SCENARIOS) of `workload`; `counters()` is read just before and
    after the timed part (the warm-up excluded). ValueError for an unknown scenario."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    if scenario != "cold":
        run_batch([workload.system + workload.warmup], 1)
    prompts = workload.prompts
    before = counters()
    start = time.perf_counter()
    if scenario == "one-by-one":
        samples = [s for p in prompts for s in run_batch([p], new_tokens)]
    else:
        samples = run_batch(prompts, new_tokens)
    seconds = time.perf_counter() - start
    after = counters()
    return Timing([s.ttft for s in samples], seconds, [s.ids for s in samples],
                  [s.cached for s in samples], sum(map(len, prompts)),
                  {k: after[k] - before[k] for k in after})



def measure(run_batch: RunBatch, spec: dict, counters: Callable[[], dict[str, int]] = dict
            ) -> dict[str, dict]:
    """{scenario: Timing as a dict} for each of spec["scenarios"], in order, after an untimed
    warm-up of every code path (2 requests of a system prompt of their own, as the warm
    scenario runs them: vLLM compiles on its first calls). Scenario i's workload is seeded
    spec["seed"] * 16 + i: the same on every engine, a new system prompt for each scenario (one
    scenario's cache never serves the next). spec: system_tokens, turn_tokens, requests,
    new_tokens, scenarios, seed."""
    warm_up = make_workload(spec["system_tokens"], spec["turn_tokens"], 2, seed=-1)
    run_scenario(run_batch, warm_up, "warm", 2)
    out = {}
    for scenario in spec["scenarios"]:
        workload = make_workload(spec["system_tokens"], spec["turn_tokens"], spec["requests"],
                                 spec["seed"] * 16 + SCENARIOS.index(scenario))
        out[scenario] = dataclasses.asdict(
            run_scenario(run_batch, workload, scenario, spec["new_tokens"], counters))
    return out
