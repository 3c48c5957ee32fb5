"""bench/prefix.py measures what it says: its prompts share exactly the system prompt, the
scenarios arrive as documented (the warm-up outside the counts), and on `tiny` the cached side
sends fewer expert rows than the uncached one (exactly: top-k x layers x the positions computed,
the cached prompt tokens skipped), with the same greedy tokens."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.prefix import SIDES, measure_ours, report
from bench.prefix_workload import SCENARIOS, Sample, make_workload, run_scenario
from model.config import PRESETS
from model.engine import Engine

SYSTEM, TURN, REQUESTS, NEW, BLOCK = 30, 5, 3, 3, 4


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@settings(max_examples=30, deadline=None)
@given(system=st.integers(1, 40), turn=st.integers(1, 8), requests=st.integers(1, 12),
       seed=st.integers(0, 1000))
def test_the_prompts_share_exactly_the_system_prompt(system, turn, requests, seed):
    w = make_workload(system, turn, requests, seed)
    prompts = w.prompts + [w.system + w.warmup]
    assert len(w.prompts) == requests and w.system[0] == 1
    assert all(len(p) == system + turn for p in prompts)
    for i, a in enumerate(prompts):
        for b in prompts[i + 1:]:
            assert common_prefix(a, b) == system
    assert make_workload(system, turn, requests, seed) == w            # seeded


@pytest.mark.parametrize("field", ["system_tokens", "turn_tokens", "requests"])
def test_a_bad_length_is_refused_by_name(field):
    sizes = {"system_tokens": 4, "turn_tokens": 2, "requests": 2, field: 0}
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        make_workload(**sizes, seed=0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_requests_arrive_as_the_scenario_says(scenario):
    """A fake engine's batches: the warm-up (1 token) first unless cold, outside the counts;
    then all at once, or one at a time."""
    w, batches, count = make_workload(6, 2, 3, seed=1), [], {"n": 0}

    def run_batch(prompts, max_tokens):
        batches.append((len(prompts), max_tokens))
        count["n"] += len(prompts)
        return [Sample(0.5, [7] * max_tokens, 4) for _ in prompts]
    t = run_scenario(run_batch, w, scenario, 2, counters=lambda: dict(count))
    timed = [(3, 2)] if scenario != "one-by-one" else [(1, 2)] * 3
    assert batches == ([] if scenario == "cold" else [(1, 1)]) + timed
    assert t.counted == {"n": 3} and t.ttft == [0.5] * 3 and t.cached == [4] * 3
    assert t.prompt_tokens == 3 * 8 and t.ids == [[7, 7]] * 3
    with pytest.raises(ValueError, match="scenario must be one of"):
        run_scenario(run_batch, w, "hot", 2)


@pytest.fixture(scope="module")
def results():
    """Both sides on `tiny`, blocks of 4: the 30-token system prompt has 7 full blocks."""
    spec = {"system_tokens": SYSTEM, "turn_tokens": TURN, "requests": REQUESTS,
            "new_tokens": NEW, "scenarios": list(SCENARIOS), "seed": 0}
    out = {}
    for caching in SIDES:
        engine = Engine.from_config("tiny", dtype="float32", block_size=BLOCK,
                                    max_num_batched_tokens=64, enable_prefix_caching=caching)
        out[caching] = measure_ours(engine, spec)
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_cached_side_sends_fewer_rows_for_the_same_tokens(results, scenario):
    off, on, cfg = results[False][scenario], results[True][scenario], PRESETS["tiny"]
    per_position = cfg.num_hidden_layers * cfg.num_experts_per_tok
    for t in (off, on):                   # each request: its prompt less what was cached, then
        computed = t["prompt_tokens"] - sum(t["cached"]) + REQUESTS * (NEW - 1)   # decodes
        assert t["counted"]["rows"] == per_position * computed
        assert all(len(ids) == NEW for ids in t["ids"])
    assert on["ids"] == off["ids"]
    assert off["cached"] == [0] * REQUESTS and off["counted"]["hits"] == 0
    assert on["counted"]["rows"] < off["counted"]["rows"]
    assert on["counted"]["hits"] == sum(on["cached"])
    assert on["counted"]["queries"] == on["prompt_tokens"]
    full = SYSTEM // BLOCK * BLOCK                 # the system prompt's full blocks, no more
    if scenario == "cold":
        assert on["cached"][0] == 0 and max(on["cached"]) <= full
    else:
        assert on["cached"] == [full] * REQUESTS


def test_the_report_puts_the_sides_side_by_side():
    def run(ttft, rows, cached):
        return {"cold": {"ttft": [ttft] * 2, "seconds": 2.0, "ids": [[1, 2], [3, 4]],
                         "cached": [cached] * 2, "prompt_tokens": 20, "counted": {"rows": rows}}}
    results = {("ours", False): [run(1.0, 4000, 0)], ("ours", True): [run(0.1, 1000, 5)]}
    table = report(results, ["cold"])
    assert "| ours in-process | cold | 1.000 / 0.100 | 10.0x |" in table
    assert "| 2 / 2 | 4k / 1k | 50% | 2 / 2 |" in table
