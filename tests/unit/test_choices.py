"""n > 1 choices of one prompt (forked from one prefill, KV blocks shared and copied on write),
prompt logprobs (`prompt_logprobs`, `max_tokens=0`), and resuming a request per choice."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.engine import Engine, InvalidRequest, Resume, SamplingParams
from model.sampling import choice_seed

PROMPTS = ["Hello, my name is", "The capital of France", "Once upon a time " * 5, "日本語 😀"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def small_blocks(tiny_checkpoint):
    """Blocks of 4 tokens and 7-token steps: prompts end mid-block (so choices copy their last
    shared block before writing) and are prefilled in chunks."""
    return Engine.from_pretrained(tiny_checkpoint, block_size=4, max_num_batched_tokens=7,
                                  max_num_seqs=16)


def _alone(engine, prompt, params: SamplingParams, index: int) -> list[int]:
    """Choice `index` run as a request of its own (n = 1, seeded as that choice)."""
    seed = None if params.seed is None else choice_seed(params.seed, index)
    alone = SamplingParams(**{**params.__dict__, "n": 1, "seed": seed})
    return engine.generate(prompt, alone)[0].token_ids


@settings(max_examples=12, **SETTINGS)
@given(prompt=st.sampled_from(PROMPTS), n=st.integers(2, 4),
       seed=st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), max_tokens=st.integers(1, 12))
def test_each_choice_equals_its_request_run_alone(small_blocks, prompt, n, seed, max_tokens):
    """Choice i draws from seed and i alone: its tokens equal an n = 1 request seeded
    choice_seed(seed, i) (choice 0: the request's own seed), which also shows that writing into
    a shared block never reached a sibling's KV. Greedy choices are all the greedy output."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if seed is None else 1.0,
                            seed=seed, n=n, ignore_eos=True)
    free = small_blocks.num_free_blocks()
    outs = small_blocks.generate(prompt, params)
    assert [o.index for o in outs] == list(range(n))
    assert [o.token_ids for o in outs] == [_alone(small_blocks, prompt, params, i)
                                           for i in range(n)]
    assert small_blocks.num_free_blocks() == free


def test_seeded_choices_differ_and_repeat(small_blocks):
    params = SamplingParams(max_tokens=8, seed=7, n=4, ignore_eos=True)
    first = [o.token_ids for o in small_blocks.generate(PROMPTS[0], params)]
    assert len({tuple(t) for t in first}) == 4
    assert [o.token_ids for o in small_blocks.generate(PROMPTS[0], params)] == first


def test_n_choices_hold_the_prompt_blocks_once(tiny_checkpoint):
    """After the prefill step the n = 8 request holds exactly the blocks n = 1 holds; each
    choice then copies the partly filled last block before its first write."""
    prompt = list(range(1, 11))                                   # 10 tokens: 3 blocks of 4
    used = {}
    for n in (1, 8):
        engine = Engine.from_pretrained(tiny_checkpoint, block_size=4)
        total = engine.num_free_blocks()
        engine.add_request(prompt, SamplingParams(max_tokens=4, n=n, seed=1, ignore_eos=True))
        chunks = engine.step()                                    # the prefill, and n first tokens
        assert sorted(c.index for c in chunks) == list(range(n))
        used[n] = total - engine.num_free_blocks()
        engine.step()
        used[n, "decoding"] = total - engine.num_free_blocks()
    assert used[8] == used[1] == 3
    assert used[8, "decoding"] == 3 + 7                           # 7 copies of the last block


def test_choices_under_kv_pressure_are_preempted_and_equal_alone(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint, block_size=4, max_model_len=64,
                                    kv_cache_memory=24 * 4 * 2 * 2 * 2 * 16 * 4)
    assert engine.kv.allocator.num_blocks == 24
    params = SamplingParams(max_tokens=30, seed=3, n=4, ignore_eos=True)
    outs = engine.generate(PROMPTS[1], params)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [_alone(engine, PROMPTS[1], params, i)
                                           for i in range(4)]
    assert engine.num_free_blocks() == 24


def test_n_over_max_num_seqs_is_refused_and_nothing_is_queued(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint, max_num_seqs=4)
    with pytest.raises(InvalidRequest, match=r"n must be at most max_num_seqs \(4\), got 5"):
        engine.generate("Hello", SamplingParams(n=5))
    assert not engine.has_unfinished() and engine.num_tracked() == 0


async def _chunks(engine, prompt, params, resume=None, take=None) -> list:
    out = []
    async for chunk in engine.stream(prompt, params, resume):
        out.append(chunk)
        if take is not None and len(out) == take:
            break
    return out


def test_a_stream_interleaves_choices_and_ends_when_all_finish(small_blocks):
    params = SamplingParams(max_tokens=6, seed=5, n=3, ignore_eos=True)
    chunks = asyncio.run(_chunks(small_blocks, PROMPTS[0], params))
    assert [c.index for c in chunks[:3]] == [0, 1, 2]
    assert sum(c.finish_reason is not None for c in chunks) == 3
    by_index = [[t for c in chunks if c.index == i for t in c.token_ids] for i in range(3)]
    assert by_index == [o.token_ids for o in small_blocks.generate(PROMPTS[0], params)]


def test_leaving_a_stream_of_choices_frees_every_block(small_blocks):
    free = small_blocks.num_free_blocks()
    params = SamplingParams(max_tokens=50, seed=5, n=4, ignore_eos=True)
    assert len(asyncio.run(_chunks(small_blocks, PROMPTS[2], params, take=9))) == 9
    small_blocks.step()      # the abort is applied at once, or after the step running then
    assert small_blocks.num_free_blocks() == free
    assert not small_blocks.has_unfinished() and small_blocks.num_tracked() == 0


@settings(max_examples=25, **SETTINGS)
@given(prompt=st.sampled_from(PROMPTS), n=st.integers(1, 4), seed=st.integers(0, 2**40),
       cut=st.integers(0, 30), stop=st.sampled_from([(), ("e",)]))
def test_a_resumed_stream_of_choices_continues_each_exactly(small_blocks, prompt, n, seed, cut,
                                                            stop):
    """The client got the first `cut` chunks of all choices, then the engine 'died': resumed
    with a Resume per unfinished choice, each choice's rest equals the undisturbed stream."""
    params = SamplingParams(max_tokens=10, seed=seed, n=n, stop=stop, top_logprobs=2)
    whole = asyncio.run(_chunks(small_blocks, prompt, params))
    got, resumes = whole[:cut], []
    for i in range(n):
        mine = [c for c in got if c.index == i]
        if not any(c.finish_reason for c in mine):
            resumes.append(Resume(tuple(t for c in mine for t in c.token_ids),
                                  tuple(lp for c in mine for lp in c.logprobs),
                                  sum(len(c.text) for c in mine),
                                  tuple(tp for c in mine for tp in c.top_logprobs), index=i))
    if not resumes:
        return
    rest = asyncio.run(_chunks(small_blocks, prompt, params, tuple(resumes)))
    for i in range(n):
        def tokens(chunks, i=i):
            return [t for c in chunks if c.index == i for t in c.token_ids]
        assert tokens(got) + tokens(rest) == tokens(whole)
        assert "".join(c.text for c in got + rest if c.index == i) == \
            "".join(c.text for c in whole if c.index == i)
        assert [len(tp) for c in rest if c.index == i for tp in c.top_logprobs] == \
            [2] * len(tokens(rest))


def test_a_resume_naming_no_choice_of_n_is_refused(tiny_engine):
    with pytest.raises(InvalidRequest, match=r"choice indices \[0, 0\]"):
        asyncio.run(_chunks(tiny_engine, "Hi", SamplingParams(n=2),
                            (Resume((), (), 0), Resume((), (), 0))))
    with pytest.raises(InvalidRequest, match=r"choice indices \[2\]"):
        asyncio.run(_chunks(tiny_engine, "Hi", SamplingParams(n=2), (Resume((5,), (0.0,), 0,
                                                                            index=2),)))
    assert not tiny_engine.has_unfinished()


# ---- prompt logprobs ---------------------------------------------------------------------

def _oracle(engine, ids: list[int], k: int) -> list:
    """log_softmax(Engine.logits(prompt)): token t's logprob from position t - 1, top k, and
    its rank (1 + the tokens more likely)."""
    logprobs = torch.log_softmax(engine.logits(ids), dim=-1)
    return [None] + [(logprobs[t - 1, ids[t]].item(), logprobs[t - 1].topk(k),
                      int((logprobs[t - 1] > logprobs[t - 1, ids[t]]).sum()) + 1)
                     for t in range(1, len(ids))]


def _assert_scores(got, want, k):
    assert got[0] is None and want[0] is None and len(got) == len(want)
    for (lp, top, rank), (want_lp, want_top, want_rank) in zip(got[1:], want[1:]):
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert abs(rank - want_rank) <= 1             # a near-tie may swap by the last bits
        assert [t for t, _ in top] == want_top.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want_top.values.tolist(), abs=1e-4)
        assert len(top) == k


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_logprobs_equal_the_logits_of_each_position(small_blocks, prompt, k):
    """Prefilled in 7-token chunks here; each prompt token's entry equals the oracle's."""
    ids = small_blocks.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=k)
    [out] = small_blocks.generate(ids, params)
    _assert_scores(out.prompt_logprobs, _oracle(small_blocks, ids, k), k)
    [scored] = small_blocks.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=k))
    assert (scored.token_ids, scored.text, scored.finish_reason) == ([], "", "length")
    assert scored.prompt_logprobs == out.prompt_logprobs


def test_prompt_logprobs_survive_preemption(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint, block_size=4, max_model_len=64,
                                    kv_cache_memory=16 * 4 * 2 * 2 * 2 * 16 * 4,
                                    max_num_batched_tokens=5)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    outs = engine.generate(PROMPTS[:3], params)
    assert engine.scheduler.num_preemptions > 0
    for out in outs:
        _assert_scores(out.prompt_logprobs, _oracle(engine, out.prompt_ids, 1), 1)


def test_prompt_logprobs_come_once_on_each_choices_first_chunk(small_blocks):
    params = SamplingParams(max_tokens=3, seed=1, n=2, prompt_logprobs=0)
    chunks = asyncio.run(_chunks(small_blocks, PROMPTS[0], params))
    firsts = [next(c for c in chunks if c.index == i) for i in range(2)]
    assert all(c.prompt_logprobs is not None for c in firsts)
    assert sum(c.prompt_logprobs is not None for c in chunks) == 2
    resumed = asyncio.run(_chunks(small_blocks, PROMPTS[0], params, (
        Resume(tuple(firsts[1].token_ids), tuple(firsts[1].logprobs), len(firsts[1].text),
               index=1),)))
    assert all(c.prompt_logprobs is None for c in resumed)         # it had them already


# ---- min_tokens and stop strings ---------------------------------------------------------

@pytest.mark.parametrize("min_tokens", [0, 1, 2, 3, 4, 6])
def test_no_stop_string_ends_a_completion_before_min_tokens(tiny_engine, min_tokens):
    """A stop string that ends in the text of the first min_tokens - 1 tokens is passed over
    (as vLLM's stop checks start at min_tokens), held back or not; the first one that ends
    after it cuts the text. Every 1- to 3-character piece of the text is tried as the stop."""
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    chunks = asyncio.run(_chunks(tiny_engine, PROMPTS[0], greedy))
    text = "".join(c.text for c in chunks)
    early = len("".join(c.text for c in chunks[:max(min_tokens - 1, 0)]))
    stops = sorted({text[i:i + n] for n in (1, 2, 3) for i in range(min(len(text), 24) - n)})
    for stop in stops:
        hit = text.find(stop, max(early - len(stop) + 1, 0))
        [out] = tiny_engine.generate(PROMPTS[0], dataclasses.replace(
            greedy, stop=(stop,), min_tokens=min_tokens))
        assert len(out.token_ids) >= max(min_tokens, 1), stop
        assert out.text == (text[:hit] if hit >= 0 else text), stop
