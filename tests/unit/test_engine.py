"""The in-process engine: continuous batching, preemption, sampling, stop conditions, streaming."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import PRESETS
from model.engine import Engine, InvalidRequest, Resume, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello, my name is", "The capital of France", "def fib(n):\n    return",
           "Once upon a time there was a very long prompt " * 6, "日本語のテキスト 😀"]


@pytest.fixture(scope="module")
def reference(tiny_engine):
    """Each prompt generated alone: what every batched or preempted run must reproduce."""
    return [tiny_engine.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def test_batched_equals_alone(tiny_engine, reference):
    assert [o.token_ids for o in tiny_engine.generate(PROMPTS, GREEDY)] == reference


def test_chunked_prefill_and_small_batches_equal_alone(tiny_checkpoint, reference):
    engine = Engine.from_pretrained(tiny_checkpoint, max_num_batched_tokens=7, max_num_seqs=2)
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == reference


def test_preemption_under_kv_pressure_equals_alone(tiny_checkpoint, reference):
    # 30 blocks of 4 tokens: too few for the five requests at once, enough for any one alone
    engine = Engine.from_pretrained(tiny_checkpoint, block_size=4, max_model_len=96,
                                    kv_cache_memory=30 * 4 * 2 * 2 * 2 * 16 * 4)
    assert engine.kv.allocator.num_blocks == 30
    outs = engine.generate(PROMPTS, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference
    assert engine.num_free_blocks() == 30


def test_requests_joining_mid_flight_equal_alone(tiny_engine, reference):
    first = tiny_engine.add_request(PROMPTS[0], GREEDY)
    got = {first: []}
    for _ in range(5):
        for chunk in tiny_engine.step():
            got[chunk.request_id] += chunk.token_ids
    late = tiny_engine.add_request(PROMPTS[1], GREEDY)
    got[late] = []
    while tiny_engine.has_unfinished():
        for chunk in tiny_engine.step():
            got[chunk.request_id] += chunk.token_ids
    for r in (first, late):
        tiny_engine.abort(r)
    assert [got[first], got[late]] == reference[:2]


def test_seeded_sampling_is_independent_of_the_batch(tiny_engine):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                            ignore_eos=True)
    alone = tiny_engine.generate(PROMPTS[0], params)[0].token_ids
    noise = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    batch = tiny_engine.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], [noise, params, noise])
    assert batch[1].token_ids == alone
    other_seed = tiny_engine.generate(PROMPTS[0], SamplingParams(
        max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(tiny_engine, reference):
    for params in (SamplingParams(max_tokens=24, temperature=1.0, top_k=1, ignore_eos=True),
                   SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6, ignore_eos=True)):
        assert tiny_engine.generate(PROMPTS[0], params)[0].token_ids == reference[0]


def test_logprobs_are_of_the_chosen_tokens(tiny_engine):
    out = tiny_engine.generate(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0))[0]
    logits = tiny_engine.logits(out.prompt_ids + out.token_ids[:-1])
    expected = logits.log_softmax(-1)[-len(out.token_ids):]
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(expected[i, tok].item() - lp) < 1e-4


def test_stop_string_cuts_the_text_exactly(tiny_engine):
    full = tiny_engine.generate(PROMPTS[0], GREEDY)[0]
    text = full.text
    assert len(text) > 8, "the tiny model should produce some text"
    stop = text[5:8]
    first = text.find(stop)
    out = tiny_engine.generate(PROMPTS[0], SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == text[:first]
    assert out.token_ids == full.token_ids[:len(out.token_ids)]


def test_stop_token_ids_and_max_tokens(tiny_engine, reference):
    stop_at = reference[0][3]
    out = tiny_engine.generate(PROMPTS[0], SamplingParams(
        max_tokens=24, temperature=0.0, stop_token_ids=(stop_at,)))[0]
    first = reference[0].index(stop_at)
    assert out.finish_reason == "stop" and out.token_ids == reference[0][:first + 1]
    out = tiny_engine.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0,
                                                          ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.token_ids == reference[0][:3]


def test_eos_stops_unless_ignored(reference):
    # the same seeded weights as the tiny checkpoint, with EOS set to the 3rd greedy token
    forced = reference[0][2]
    engine = Engine.from_config(dataclasses.replace(PRESETS["tiny"], eos_token_id=forced))
    out = engine.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == reference[0][:reference[0].index(forced) + 1]
    assert engine.generate(PROMPTS[0], GREEDY)[0].token_ids == reference[0]


def test_stream_concatenates_to_generate(tiny_engine):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=("zz",))
    expected = tiny_engine.generate(PROMPTS, params)

    async def run(prompt):
        chunks = [c async for c in tiny_engine.stream(prompt, params)]
        return chunks

    async def main():
        return await asyncio.gather(*(run(p) for p in PROMPTS))

    for chunks, want in zip(asyncio.run(main()), expected):
        assert "".join(c.text for c in chunks) == want.text
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert chunks[-1].finish_reason == want.finish_reason
        assert all(c.finish_reason is None for c in chunks[:-1])


async def _chunks(engine, prompt, params, resume=None) -> list:
    return [c async for c in engine.stream(prompt, params, resume)]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.sampled_from(PROMPTS), seed=st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
       stop=st.sampled_from([(), ("zz",), ("e",), (" t", "a ")]), cut=st.integers(0, 30))
def test_a_resumed_stream_continues_exactly_where_the_client_left_off(tiny_engine, prompt, seed,
                                                                      stop, cut):
    """The client got the first `cut` chunks, then the engine 'died': resumed with what it got
    (tokens, logprobs, characters of text), the rest equals the undisturbed stream, greedy or
    seeded (draws depend on seed and position only), stop strings and held-back text alike."""
    params = SamplingParams(max_tokens=20, temperature=0.0 if seed is None else 1.0, seed=seed,
                            stop=stop)
    whole = asyncio.run(_chunks(tiny_engine, prompt, params))
    if cut >= len(whole):
        return                                     # finished before the cut: nothing to resume
    got = whole[:cut]
    resume = Resume(tuple(t for c in got for t in c.token_ids),
                    tuple(lp for c in got for lp in c.logprobs), sum(len(c.text) for c in got))
    rest = asyncio.run(_chunks(tiny_engine, prompt, params, resume))
    assert [t for c in got + rest for t in c.token_ids] == [t for c in whole for t in c.token_ids]
    assert "".join(c.text for c in got + rest) == "".join(c.text for c in whole)
    assert [lp for c in rest for lp in c.logprobs] == \
        pytest.approx([lp for c in whole[cut:] for lp in c.logprobs], abs=1e-5)
    assert rest[-1].finish_reason == whole[-1].finish_reason


@pytest.mark.parametrize("resume, needle", [
    (Resume((5, 6), (0.0,), 0), "2 token ids but 1 logprobs"),
    (Resume((5,) * 20, (0.0,) * 20, 0), "not the state of an unfinished request"),   # max_tokens
    (Resume((2,), (0.0,), 0), "not the state of an unfinished request"),             # EOS
    (Resume((5,), (0.0,), 99), "not the state of an unfinished request"),            # text
    (Resume((10**6,), (0.0,), 0), "resume: token id 1000000 out of range"),
])
def test_an_impossible_resume_state_is_refused(tiny_engine, resume, needle):
    with pytest.raises(InvalidRequest, match=needle):
        asyncio.run(_chunks(tiny_engine, "Hello", SamplingParams(max_tokens=20), resume))
    assert not tiny_engine.has_unfinished()


def test_leaving_a_stream_frees_its_blocks(tiny_engine):
    start = tiny_engine.num_free_blocks()

    async def main():
        got = 0
        async for _ in tiny_engine.stream(PROMPTS[3], GREEDY):
            got += 1
            if got == 3:
                break
        return got

    assert asyncio.run(main()) == 3
    tiny_engine.step()   # the abort is applied at once, or after the step running then
    assert tiny_engine.num_free_blocks() == start and not tiny_engine.has_unfinished()


@pytest.mark.parametrize("prompt, params, match", [
    ("", SamplingParams(), "prompt must not be empty"),
    ([1, 40000], SamplingParams(), r"token ids must be integers in \[0, 32000\)"),
    ("hi", SamplingParams(max_tokens=5000), r"max_tokens \(5000\) exceeds max_model_len \(4096\)"),
    ([1, True], SamplingParams(), r"token ids must be integers"),
    (7, SamplingParams(), "prompt must be text or a list of token ids"),
    ("hi", SamplingParams(stop_token_ids=(32000,)), r"stop_token_ids must be in \[0, 32000\)"),
])
def test_bad_requests_are_rejected_with_the_field(tiny_engine, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine.generate(prompt, params)
    assert not tiny_engine.has_unfinished()


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(stop=("",)), "stop"), (dict(seed="x"), "seed"),
])
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_generate_in_a_thread_and_streams_share_the_engine(tiny_engine, reference):
    async def collect(prompt):
        return [t async for c in tiny_engine.stream(prompt, GREEDY) for t in c.token_ids]

    async def main():
        streams = asyncio.gather(*(collect(p) for p in PROMPTS[:2]))
        generated = asyncio.to_thread(tiny_engine.generate, PROMPTS[2:], GREEDY)
        return await asyncio.gather(streams, generated)

    streams, generated = asyncio.run(main())
    assert streams == reference[:2]
    assert [o.token_ids for o in generated] == reference[2:]


def test_a_failing_step_fails_its_requests_and_the_engine_carries_on(tiny_checkpoint, reference):
    engine = Engine.from_pretrained(tiny_checkpoint)
    moe, calls = engine.moe, []

    def flaky(layer, x, weights, experts):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("expert exploded")
        return moe(layer, x, weights, experts)

    engine.moe = flaky
    with pytest.raises(RuntimeError, match="expert exploded"):
        engine.generate(PROMPTS[:2], GREEDY)
    assert engine.num_free_blocks() == engine.kv.allocator.num_blocks

    async def stream_fails():
        calls.clear()
        with pytest.raises(RuntimeError, match="expert exploded"):
            async for _ in engine.stream(PROMPTS[0], GREEDY):
                pass

    asyncio.run(stream_fails())
    engine.step()   # the stream thread may still be in a step: its abort is applied after it
    assert not engine.has_unfinished() and not engine._tracked
    assert [o.token_ids for o in engine.generate(PROMPTS[:2], GREEDY)] == reference[:2]


def test_a_full_queue_is_refused(tiny_checkpoint):
    from model.engine import QueueFull
    engine = Engine.from_pretrained(tiny_checkpoint, max_waiting=2)
    engine.add_request("a", GREEDY)
    engine.add_request("b", GREEDY)
    with pytest.raises(QueueFull, match=r"max_waiting=2"):
        engine.add_request("c", GREEDY)


def test_two_micro_batches_equal_one(tiny_checkpoint, reference):
    engine = Engine.from_pretrained(tiny_checkpoint, micro_batches=2, max_num_batched_tokens=64)
    calls = []
    begin = engine.moe_begin
    engine.moe_begin = lambda *a: calls.append(a[1].shape[0]) or begin(*a)
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == reference
    assert len(calls) > 0, "the micro-batched path never ran"
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    single = Engine.from_pretrained(tiny_checkpoint, max_num_batched_tokens=64)
    for got, want in zip(engine.logits(ids), single.logits(ids)):
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    with pytest.raises(ValueError, match="micro_batches"):
        Engine.from_pretrained(tiny_checkpoint, micro_batches=3)
