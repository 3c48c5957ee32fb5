"""Issue 21 over the OpenAI HTTP API, without a server: `n`, penalties, `logit_bias`,
`min_tokens`, `stop_token_ids`, top logprobs, `echo` and vLLM's `prompt_logprobs` translated
to SamplingParams (actors/serving/openai_api.py) and rendered in OpenAI's and vLLM's shapes
(openai_responses.py), the stream of n interleaved choices (http_app.py) and `collect`
(engine_client.py). tests/e2e/test_openai.py checks the values against the in-process engine."""
from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.info import EngineInfo
from actors.serving import openai_api as oai
from actors.serving import openai_responses as responses
from actors.serving.engine_client import EngineClient, collect
from actors.serving.http_app import _events
from model.errors import InvalidRequest
from model.output import Completion, StreamChunk
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer

INFO = EngineInfo(context_length=256, vocab_size=32000, num_layers=2, num_experts=8,
                  experts_per_token=2, frontend_node_id="head", experts={}, free_blocks=1,
                  total_blocks=1, retries=0)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()


def completion(tokenizer, **body) -> SamplingParams:
    r = oai.CompletionRequest.model_validate({"model": "m", "prompt": "hi"} | body)
    return oai.completion_inputs(r, tokenizer, INFO)[1]


def chat(tokenizer, **body) -> SamplingParams:
    r = oai.ChatCompletionRequest.model_validate({"model": "m", "messages": USER} | body)
    return oai.chat_inputs(r, tokenizer, INFO)[1]


def test_every_new_field_reaches_the_sampling_params(tokenizer):
    body = dict(n=3, presence_penalty=0.5, frequency_penalty=-1.5, repetition_penalty=1.3,
                logit_bias={"17": -100, "5": 2.5}, min_tokens=2, stop_token_ids=[7, 9],
                max_tokens=8, seed=4, cache_salt="tenant-a")
    for params in (completion(tokenizer, logprobs=4, prompt_logprobs=2, **body),
                   chat(tokenizer, logprobs=True, top_logprobs=4, prompt_logprobs=2, **body)):
        assert (params.n, params.presence_penalty, params.frequency_penalty) == (3, 0.5, -1.5)
        assert params.repetition_penalty == 1.3 and params.min_tokens == 2
        assert params.logit_bias == ((5, 2.5), (17, -100.0))
        assert params.stop_token_ids == (7, 9) and params.top_logprobs == 4
        assert params.prompt_logprobs == 2 and params.seed == 4
        assert params.cache_salt == "tenant-a"


def test_chat_top_logprobs_only_with_logprobs(tokenizer):
    assert chat(tokenizer, logprobs=True).top_logprobs == 0
    assert chat(tokenizer, logprobs=False).top_logprobs == 0
    with pytest.raises(InvalidRequest, match="top_logprobs: needs logprobs: true"):
        chat(tokenizer, top_logprobs=3)


@pytest.mark.parametrize("body, max_tokens, prompt_logprobs, top", [
    (dict(echo=True, max_tokens=0, logprobs=3), 0, 3, 3),      # lm-eval's loglikelihood
    (dict(echo=True, max_tokens=0), 0, 0, 0),                  # the prompt echoed, no logprobs
    (dict(echo=True, max_tokens=4), 4, None, 0),               # echo alone: no prompt scoring
    (dict(echo=True, logprobs=1, prompt_logprobs=5), 16, 5, 1),  # the larger of the two
    (dict(echo=True, logprobs=5, prompt_logprobs=1), 16, 5, 5),
    (dict(logprobs=2, prompt_logprobs=1), 16, 1, 2),           # no echo: prompt_logprobs alone
    (dict(prompt_logprobs=0, max_tokens=0), 0, 0, 0),
])
def test_echo_and_prompt_logprobs_translate(tokenizer, body, max_tokens, prompt_logprobs, top):
    params = completion(tokenizer, **body)
    assert (params.max_tokens, params.prompt_logprobs, params.top_logprobs) == \
        (max_tokens, prompt_logprobs, top)


@pytest.mark.parametrize("chat_api, body, needle", [
    (False, dict(n=17), r"^n must be an integer in \[1, 16\], got 17"),
    (True, dict(n=0), r"^n must be an integer in \[1, 16\], got 0"),
    (False, dict(best_of=2), "^best_of: only 1 is supported"),
    (False, dict(presence_penalty=2.5), r"^presence_penalty must be in \[-2, 2\], got 2.5"),
    (True, dict(frequency_penalty=-3), r"^frequency_penalty must be in \[-2, 2\], got -3"),
    (False, dict(repetition_penalty=0), "^repetition_penalty must be a finite number > 0"),
    (True, dict(logit_bias={"abc": 1}), "^logit_bias: keys must be token ids .*'abc'"),
    (False, dict(logit_bias={"1.5": 1}), "^logit_bias: keys must be token ids"),
    (False, dict(logit_bias={"32000": 1}), r"^logit_bias: token ids must be in \[0, 32000\)"),
    (False, dict(logit_bias={"-1": 1}), r"^logit_bias: token ids must be in \[0, 32000\)"),
    (True, dict(logit_bias={"5": 101}), r"^logit_bias values must be in \[-100, 100\]"),
    (False, dict(logit_bias={str(i): 1 for i in range(301)}), "^logit_bias must hold at most 300"),
    (False, dict(logprobs=21), r"^logprobs: must be an integer in \[0, 20\] .*got 21"),
    (False, dict(logprobs=-1), r"^logprobs: must be an integer in \[0, 20\]"),
    (False, dict(prompt_logprobs=21, echo=True, logprobs=2),
     r"^prompt_logprobs: must be an integer in \[0, 20\]"),
    (True, dict(prompt_logprobs=-1), r"^prompt_logprobs: must be an integer in \[0, 20\]"),
    (True, dict(logprobs=True, top_logprobs=21),
     r"^top_logprobs must be an integer in \[0, 20\]"),
    (True, dict(echo=True), "^echo: is not supported by chat completions"),
    (False, dict(min_tokens=6, max_tokens=5),
     r"^min_tokens must be an integer in \[0, max_tokens \(5\)\]"),
    (True, dict(stop_token_ids=[32000]), r"^stop_token_ids: token ids must be in \[0, 32000\)"),
    (True, dict(cache_salt=""), "^cache_salt must be a non-empty string of at most 1024"),
    (False, dict(cache_salt="s" * 1025), "^cache_salt must be a non-empty string of at most 1024"),
    (False, dict(max_tokens=0), r"^max_tokens must be in \[1, .*got 0; 0 only with "
                                r"prompt_logprobs \(completions: echo\)"),  # nothing to do
    (False, dict(max_tokens=0, logprobs=0), r"^max_tokens must be in \[1, "),
])
def test_bad_values_name_the_field_and_its_limit(tokenizer, chat_api, body, needle):
    with pytest.raises(InvalidRequest, match=needle) as e:
        (chat if chat_api else completion)(tokenizer, **body)
    field = needle.lstrip("^").split(" ")[0].rstrip(":")
    assert responses.error_body(400, str(e.value))["error"]["param"] == field


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 16), presence=st.floats(-2, 2), frequency=st.floats(-2, 2),
       repetition=st.floats(0.01, 5), min_tokens=st.integers(0, 8),
       bias=st.dictionaries(st.integers(0, 31999), st.floats(-100, 100), max_size=5),
       top=st.integers(0, 20), prompt=st.none() | st.integers(0, 20), chat_api=st.booleans())
def test_any_valid_mix_is_the_sampling_params_it_names(tokenizer, n, presence, frequency,
                                                       repetition, min_tokens, bias, top, prompt,
                                                       chat_api):
    body = dict(n=n, presence_penalty=presence, frequency_penalty=frequency, max_tokens=8,
                repetition_penalty=repetition, min_tokens=min_tokens, prompt_logprobs=prompt,
                logit_bias={str(k): v for k, v in bias.items()})
    params = (chat(tokenizer, logprobs=True, top_logprobs=top, **body) if chat_api
              else completion(tokenizer, logprobs=top, **body))
    assert params == SamplingParams(
        max_tokens=8, n=n, presence_penalty=presence, frequency_penalty=frequency,
        repetition_penalty=repetition, min_tokens=min_tokens, logit_bias=bias, top_logprobs=top,
        prompt_logprobs=prompt)


# ---- response bodies ------------------------------------------------------------------------
def _event(event: str) -> dict:
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[len("data: "):])


def test_chat_top_logprobs_in_openais_shape(tokenizer):
    ids = tokenizer.encode("Hello there", bos=False)
    out = responses.Response(True, "m", tokenizer, responses.Shape(logprobs=True))
    tops = [[(ids[0], -0.1), (ids[1], -2.5)], [(ids[1], -0.2), (ids[0], -3.0)]]
    body = out.whole([Completion("r", [], ids, "Hello there", "length", [-0.1, -0.2],
                                 top_logprobs=tops)], 3)
    [first, second] = body["choices"][0]["logprobs"]["content"]
    assert first == {"token": " Hello", "logprob": -0.1, "bytes": list(b" Hello"),
                     "top_logprobs": [
                         {"token": " Hello", "logprob": -0.1, "bytes": list(b" Hello")},
                         {"token": " there", "logprob": -2.5, "bytes": list(b" there")}]}
    assert [e["token"] for e in second["top_logprobs"]] == [" there", " Hello"]


def test_completions_top_logprobs_hold_the_chosen_token_then_the_alternatives(tokenizer):
    hello, there = tokenizer.encode("Hello there", bos=False)
    out = responses.Response(False, "m", tokenizer, responses.Shape(logprobs=True, top_logprobs=2))
    # `there` sampled although `hello` was likelier; an alternative spelled like another keeps
    # the first value
    lp = out.whole([Completion("r", [], [there], " there", "length", [-1.5],
                               top_logprobs=[[(hello, -0.5), (there, -1.5)]])], 1)
    lp = lp["choices"][0]["logprobs"]
    assert lp["tokens"] == [" there"] and lp["token_logprobs"] == [-1.5]
    assert lp["top_logprobs"] == [{" there": -1.5, " Hello": -0.5}]
    assert list(lp["top_logprobs"][0]) == [" there", " Hello"]
    without = responses.Response(False, "m", tokenizer, responses.Shape(logprobs=True))
    lp = without.whole([Completion("r", [], [there], " there", "length", [-1.5])], 1)
    assert lp["choices"][0]["logprobs"]["top_logprobs"] == [{" there": -1.5}]   # logprobs: 0


def _scored_prompt(tokenizer, text: str, k: int):
    """(prompt ids, prompt logprobs as the engine gives them: None, then (logprob, top k))."""
    ids = tokenizer.encode(text)
    entries = [None] + [(-1.0 - i, [(t, -0.5 - j) for j, t in enumerate([29, 30, 31][:k])])
                        for i, _ in enumerate(ids[1:])]
    return ids, entries


def test_echo_with_logprobs_puts_the_prompts_entries_first(tokenizer):
    ids, prompt = _scored_prompt(tokenizer, "Hello there", k=2)
    out = responses.Response(False, "m", tokenizer, responses.Shape(
        logprobs=True, top_logprobs=1, echo="Hello there"), ids)
    gen = tokenizer.encode("!", bos=False)                       # " !" after the prompt
    body = out.whole([Completion("r", ids, gen, " !", "length", [-0.25], prompt_logprobs=prompt,
                                 top_logprobs=[[(gen[0], -0.25)]])], len(ids))
    [choice] = body["choices"]
    assert choice["text"] == "Hello there !"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["", "Hello", " there", " !"]          # they spell the text
    assert lp["token_logprobs"] == [None, -1.0, -2.0, -0.25]
    assert lp["top_logprobs"][0] is None
    decoded = responses.token_text(tokenizer.token_bytes(29))
    assert lp["top_logprobs"][1] == {"Hello": -1.0, decoded: -0.5}             # k = 1
    assert lp["text_offset"] == [0, 0, 5, 11]
    assert "prompt_logprobs" not in choice            # vLLM's field only when asked
    assert body["usage"] == responses.usage(len(ids), 1)


def test_echo_of_a_scored_prompt_generates_nothing(tokenizer):
    ids, prompt = _scored_prompt(tokenizer, "Hi", k=0)
    out = responses.Response(False, "m", tokenizer, responses.Shape(echo="Hi"), ids)
    body = out.whole([Completion("r", ids, [], "", "length", [], prompt_logprobs=prompt)], 2)
    assert body["choices"][0]["text"] == "Hi" and body["choices"][0]["logprobs"] is None
    assert body["usage"]["completion_tokens"] == 0


def test_vllms_prompt_logprobs_shape(tokenizer):
    ids, prompt = _scored_prompt(tokenizer, "Hello there", k=3)
    prompt[2] = (prompt[2][0], [(ids[2], prompt[2][0])] + prompt[2][1][:2])   # in its top
    shape = responses.Shape(prompt_logprobs=2)
    body = responses.Response(False, "m", tokenizer, shape, ids).whole(
        [Completion("r", ids, [5], "x", "length", [-1.0], prompt_logprobs=prompt)], 3)
    got = json.loads(json.dumps(body))["choices"][0]["prompt_logprobs"]
    decoded = responses.token_text(tokenizer.token_bytes(29))
    assert got[0] is None and len(got) == len(ids)
    assert got[1] == {str(ids[1]): {"logprob": -1.0, "rank": None, "decoded_token": " Hello"},
                      "29": {"logprob": -0.5, "rank": 1, "decoded_token": decoded},
                      "30": {"logprob": -1.5, "rank": 2, "decoded_token": "\x1b"}}
    assert list(got[2]) == [str(ids[2]), "29"] and got[2][str(ids[2])]["rank"] == 1
    ranked_prompt = [*prompt[:1], (*prompt[1][:2], 7), *prompt[2:]]   # the engine's rank
    ranked = responses.Response(False, "m", tokenizer, shape, ids).whole(
        [Completion("r", ids, [5], "x", "length", [-1.0], prompt_logprobs=ranked_prompt)], 3)
    assert ranked["choices"][0]["prompt_logprobs"][1][str(ids[1])]["rank"] == 7
    chat_body = responses.Response(True, "m", tokenizer, shape, ids).whole(
        [Completion("r", ids, [5], "x", "length", [-1.0], prompt_logprobs=prompt)], 3)
    assert chat_body["prompt_logprobs"] == body["choices"][0]["prompt_logprobs"]  # vLLM: body's
    assert "prompt_logprobs" not in chat_body["choices"][0]


def test_minus_infinity_is_written_as_openai_writes_it(tokenizer):
    out = responses.Response(True, "m", tokenizer, responses.Shape(logprobs=True))
    body = out.whole([Completion("r", [], [5], "x", "length", [-math.inf],
                                 top_logprobs=[[(5, -math.inf)]])], 1)
    text = json.dumps(body, allow_nan=False)                   # valid JSON: no -Infinity
    assert json.loads(text)["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0


def test_n_choices_whole_and_streamed(tokenizer):
    a, b = tokenizer.encode("a b", bos=False)
    whole = responses.Response(False, "m", tokenizer).whole(
        [Completion("r", [], [b, b], " b b", "stop", [-1, -1], index=1),
         Completion("r", [], [a], " a", "length", [-1], index=0)], 4)
    assert [(c["index"], c["text"]) for c in whole["choices"]] == [(0, " a"), (1, " b b")]
    assert whole["usage"] == responses.usage(4, 3)            # the prompt once, every choice's
    out = responses.Response(True, "m", tokenizer)
    events = [_event(out.chunk(StreamChunk("r", t, [i], [-1.0], f, index=i)))
              for t, i, f in [("a", 0, None), ("b", 1, None), ("c", 1, "stop"), ("d", 0, "length")]]
    deltas = [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events]
    assert deltas == [(0, {"role": "assistant", "content": "a"}),
                      (1, {"role": "assistant", "content": "b"}),
                      (1, {"content": "c"}), (0, {"content": "d"})]


def test_a_streamed_echo_and_prompt_logprobs_go_with_each_choices_first_chunk(tokenizer):
    ids, prompt = _scored_prompt(tokenizer, "Hi", k=1)
    [x] = tokenizer.encode("x", bos=False)                       # " x" after the prompt
    out = responses.Response(False, "m", tokenizer, responses.Shape(
        logprobs=True, top_logprobs=1, echo="Hi", prompt_logprobs=1), ids)
    events = [_event(out.chunk(StreamChunk("r", t, [x], [-1.0], None, index=i,
                                           top_logprobs=[[(x, -1.0)]],
                                           prompt_logprobs=prompt if first else None)))
              for t, i, first in [(" x", 0, True), (" x", 1, True), (" x", 0, False)]]
    choices = [e["choices"][0] for e in events]
    assert [c["index"] for c in choices] == [0, 1, 0]
    assert [c["text"] for c in choices] == ["Hi x", "Hi x", " x"]
    assert [c["logprobs"]["tokens"] for c in choices] == [["", "Hi", " x"]] * 2 + [[" x"]]
    assert [c["logprobs"]["text_offset"] for c in choices] == [[0, 0, 2], [0, 0, 2], [4]]
    assert [c["logprobs"]["token_logprobs"][0] for c in choices] == [None, None, -1.0]
    assert [("prompt_logprobs" in c) for c in choices] == [True, True, False]
    chat_out = responses.Response(True, "m", tokenizer, responses.Shape(prompt_logprobs=1), ids)
    chat_events = [_event(chat_out.chunk(StreamChunk("r", "x", [5], [-1.0], None, index=i,
                                                     prompt_logprobs=prompt)))
                   for i in (0, 1)]
    assert ["prompt_logprobs" in e for e in chat_events] == [True, False]   # once, in the body


# ---- the stream of n choices and collect ------------------------------------------------------
class FakeStream:
    """An engine stream of given chunks (an async iterator with cancel())."""

    def __init__(self, chunks):
        self.chunks, self.cancelled = iter(chunks), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self.chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self):
        self.cancelled = True


def _interleaved():
    top = [[(3, -0.5)]]
    return [StreamChunk("r", "a", [3], [-0.5], None, 0, top, prompt_logprobs=[None]),
            StreamChunk("r", "b", [4], [-0.7], None, 1, [[(3, -0.6)]], prompt_logprobs=[None]),
            StreamChunk("r", "c", [3], [-0.5], "length", 0, top),
            StreamChunk("r", "d", [4], [-0.7], "stop", 1, [[(3, -0.6)]])]


def test_collect_returns_one_completion_per_choice():
    got = asyncio.run(collect(FakeStream(_interleaved()), [1, 2]))
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in got] == [
        (0, "ac", [3, 3], "length"), (1, "bd", [4, 4], "stop")]
    assert got[0].top_logprobs == [[(3, -0.5)]] * 2 and got[1].logprobs == [-0.7, -0.7]
    assert got[0].prompt_logprobs == [None] and got[0].prompt_ids == [1, 2]


def test_a_stream_ends_after_every_choice_finished_and_counts_them_all(tokenizer):
    chunks = _interleaved()
    stream = FakeStream(chunks[1:] + [StreamChunk("r", "never", [9], [0.0], None)])
    out = responses.Response(False, "m", tokenizer)

    async def run():
        return [e async for e in _events(out, chunks[0], stream, 2, 2, include_usage=True)]
    events = asyncio.run(run())
    assert events[-1] == responses.DONE and stream.cancelled
    bodies = [_event(e) for e in events[:-1]]
    assert [b["choices"][0]["text"] for b in bodies[:-1]] == ["a", "b", "c", "d"]
    assert bodies[-1]["usage"] == responses.usage(2, 4)


class FakeEngine:
    """What http_app.completion needs of an EngineClient; records the streams it opens."""

    def __init__(self, tokenizer, chunks):
        self.tokenizer, self.model_name, self.chunks, self.opened = tokenizer, "m", chunks, []

    async def info(self):
        return INFO

    check = EngineClient.check      # the real one: a grammar that does not compile is a 400

    def stream(self, ids, params):
        self.opened.append(params)
        return FakeStream(self.chunks)


@pytest.mark.parametrize("body, status", [
    ({"n": 2, "presence_penalty": 1.0}, 200), ({"n": 17}, 400), ({"logit_bias": {"x": 1}}, 400),
    ({"min_tokens": 6, "max_tokens": 5}, 400), ({"echo": True}, 400),
    # issue 22: a grammar that does not compile is refused before the engine is asked
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, 400),
    ({"guided_regex": "(unclosed", "stream": True}, 400),
])
def test_the_gateway_asks_the_engine_for_n_choices_and_never_for_a_refused_request(
        tokenizer, body, status):
    from actors.serving.http_app import completion
    engine = FakeEngine(tokenizer, _interleaved())
    request = oai.ChatCompletionRequest.model_validate({"model": "m", "messages": USER} | body)
    response = asyncio.run(completion(engine, request, chat=True))
    assert response.status_code == status
    if status == 400:
        assert engine.opened == [] and json.loads(response.body)["error"]["param"]
        return
    assert [p.n for p in engine.opened] == [2]
    choices = json.loads(response.body)["choices"]
    assert [(c["index"], c["message"]["content"]) for c in choices] == [(0, "ac"), (1, "bd")]
