"""Admission and isolation in the engine: a rejected call leaves nothing behind, adds and aborts
never wait for a running step, and one request's failure fails that request only."""
from __future__ import annotations

import asyncio
import math
import threading

import pytest

from model.engine import Engine, InvalidRequest, QueueFull, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello, my name is", "The capital of France", "def fib(n):\n    return"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def reference(engine):
    return [engine.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def assert_idle(engine: Engine) -> None:
    assert not engine.has_unfinished() and not engine._tracked and not engine._pending
    assert engine.num_free_blocks() == engine.kv.allocator.num_blocks


@pytest.mark.parametrize("call", ["generate", "logits"])
@pytest.mark.parametrize("bad", ["x " * 5000, "y" * 10**6, [1, 32000], ""])
def test_a_rejected_batch_queues_nothing(engine, reference, call, bad):
    with pytest.raises(InvalidRequest):
        if call == "generate":
            engine.generate([PROMPTS[0], bad], GREEDY)
        else:
            engine.logits([PROMPTS[0], bad])
    assert_idle(engine)
    assert engine.generate(PROMPTS[1], GREEDY)[0].token_ids == reference[1]
    assert_idle(engine)


def test_a_full_queue_refuses_the_whole_batch(tiny_checkpoint):
    small = Engine.from_pretrained(tiny_checkpoint, max_waiting=1)
    small.add_request("a", GREEDY)
    with pytest.raises(QueueFull, match=r"max_waiting=1"):
        small.generate(PROMPTS, GREEDY)
    assert len(small._tracked) == 1 and len(small.scheduler.waiting) == 1


def test_a_tiny_temperature_is_greedy_and_harms_no_neighbour(engine, reference):
    params = [SamplingParams(max_tokens=12, temperature=t, ignore_eos=True, seed=5)
              for t in (1e-40, 1e-30, 5e-324)]
    outs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == reference
    assert all(math.isfinite(lp) for o in outs for lp in o.logprobs)


def test_non_finite_logits_fail_only_that_request(engine, reference):
    compute = engine.model.compute_logits

    def poisoned(hidden):          # the first row of every sampling batch (the oldest request)
        logits = compute(hidden).clone()
        if logits.shape[0] == len(PROMPTS):
            logits[0, 7] = math.nan
        return logits

    async def run(prompt):
        return [t async for c in engine.stream(prompt, GREEDY) for t in c.token_ids]

    async def main():
        return await asyncio.gather(*(run(p) for p in PROMPTS), return_exceptions=True)

    engine.model.compute_logits = poisoned
    try:
        results = asyncio.run(main())
    finally:
        del engine.model.compute_logits
    assert isinstance(results[0], RuntimeError) and "not finite" in str(results[0])
    assert results[1:] == reference[1:]
    engine.step()
    assert_idle(engine)


def test_adds_and_aborts_do_not_wait_for_a_running_step(engine, reference):
    """A step blocked inside the model must not block add_request or abort."""
    moe, entered, release = engine.moe, threading.Event(), threading.Event()

    def blocking(layer, x, weights, experts):
        entered.set()
        release.wait(timeout=60)
        return moe(layer, x, weights, experts)

    first = engine.add_request(PROMPTS[0], GREEDY)
    engine.moe = blocking
    stepper = threading.Thread(target=engine.step)
    try:
        stepper.start()
        assert entered.wait(timeout=60)
        done = {}
        caller = threading.Thread(target=lambda: done.update(
            late=engine.add_request(PROMPTS[1], GREEDY), aborted=engine.abort(first)))
        caller.start()
        caller.join(timeout=30)
        assert not caller.is_alive() and "late" in done, "add/abort waited for the step"
        assert not release.is_set() and stepper.is_alive()
    finally:
        release.set()
        stepper.join()
        engine.moe = moe
    assert first not in engine._tracked                  # applied at the step boundary
    got = []
    while engine.has_unfinished():
        got += [t for c in engine.step() if c.request_id == done["late"] for t in c.token_ids]
    engine.abort(done["late"])
    assert got == reference[1]
    assert_idle(engine)
