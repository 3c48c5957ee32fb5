"""The OpenAI-compatible HTTP API through Serve's real HTTP proxy (free port), called with the
official `openai` client (sync, async, streaming) and raw HTTP; same tokens as gRPC and as the
in-process engine."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import pytest
import torch

from model.engine import Engine, SamplingParams
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")

MODEL = "tiny"                  # the shared app's (tests/e2e/conftest.py: TINY_MODEL)


@pytest.fixture(scope="module")
def server(tiny_app):
    assert tiny_app.model == MODEL
    return tiny_app.stub


@pytest.fixture(scope="module")
def base_url(server, http_port) -> str:
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint)


def http(base_url: str, method: str, path: str, body: dict | bytes | None = None):
    """(status, parsed JSON body) of a raw HTTP call."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_models_and_health(base_url, client, reference):
    [model] = client.models.list().data
    assert model.id == MODEL and model.max_model_len == reference.max_model_len
    assert http(base_url, "GET", "/health") == (200, {"status": "ok"})
    status, body = http(base_url, "GET", "/no/such/path")
    assert status == 404 and body["error"]["type"] == "not_found_error"


def test_completion_equals_grpc_and_the_in_process_engine(client, grpc_port, reference):
    prompt = "The capital of France is"
    want = reference.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0))[0]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    [choice] = got.choices
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert choice.token_ids == want.token_ids
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(want.prompt_ids), 12)
    assert got.id.startswith("cmpl-") and got.created > 0 and got.model == MODEL
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        over_grpc = pb_grpc.GeneratorStub(channel).Generate(
            pb.GenerateRequest(prompt=prompt, max_tokens=12, temperature=0.0), timeout=60)
    assert list(over_grpc.token_ids) == choice.token_ids


def test_seeded_sampling_over_http_equals_grpc(client, grpc_port):
    kwargs = dict(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234)
    got = client.completions.create(model=MODEL, prompt="Once upon a time",
                                    extra_body={"return_token_ids": True, "top_k": 50}, **kwargs)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        over_grpc = pb_grpc.GeneratorStub(channel).Generate(
            pb.GenerateRequest(prompt="Once upon a time", top_k=50, **kwargs), timeout=60)
    assert got.choices[0].token_ids == list(over_grpc.token_ids)


def test_token_id_prompt_and_logprobs(client, reference):
    ids = reference.tokenizer.encode("Hello there")
    want = reference.generate([ids], SamplingParams(max_tokens=5, temperature=0.0))[0]
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                    logprobs=0)
    lp = got.choices[0].logprobs
    assert got.choices[0].text == want.text
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert len(lp.tokens) == 5
    if "\ufffd" not in want.text and not any(t.startswith("bytes:") for t in lp.tokens):
        assert "".join(lp.tokens) == want.text                  # leading spaces kept
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(5)] or \
        any(t.startswith("bytes:") for t in lp.tokens)


def test_streaming_chat_with_usage_equals_unary(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                           temperature=0, logprobs=True)
    assert unary.choices[0].message.role == "assistant"
    assert len(unary.choices[0].logprobs.content) == unary.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finished = [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason]
    assert finished == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


def test_async_client_concurrent_streams(base_url, client):
    prompts = ["Hello, my name is", "def fib(n):", "Once upon a time"]
    want = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
            .choices[0].text for p in prompts]

    async def one(aclient, prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused",
                                      max_retries=0, timeout=60) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))
    assert asyncio.run(main()) == want


@pytest.mark.parametrize("body, status, needle", [
    ({"prompt": "hi", "temperature": -1}, 400, "temperature must be a finite number >= 0"),
    ({"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens must be in [1, "),
    ({"prompt": "hi", "n": 17}, 400, "n must be an integer in [1, 16], got 17"),
    ({"prompt": "hi", "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs: must be an integer in [0, 20]"),
    ({"prompt": "hi", "logit_bias": {"a": 1}}, 400, "logit_bias: keys must be token ids"),
    ({"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2]"),
    ({"prompt": "hi", "min_tokens": 9, "max_tokens": 8}, 400,
     "min_tokens must be an integer in [0, max_tokens (8)]"),
    ({"prompt": [1, 10**9]}, 400, "prompt token ids must be integers in [0, "),
    ({"prompt": ["a", "b"]}, 400, "prompt: one prompt per request"),
    ({"prompt": ""}, 400, "prompt: must not be empty"),
    ({"prompt": ["a", 1]}, 400, "prompt must be a string, a list of token ids, or a list"),
    ({"prompt": "hi", "temperature": "0.5"}, 400, "temperature: Input should be a valid number"),
    ({}, 400, "prompt: Field required"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
])
def test_bad_completion_requests_name_the_field(base_url, body, status, needle):
    got_status, got = http(base_url, "POST", "/v1/completions", {"model": MODEL} | body)
    assert got_status == status, got
    assert needle in got["error"]["message"] and got["error"]["type"]


@pytest.mark.parametrize("body, needle", [
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs must be an integer in [0, 20]"),
    ({"messages": [{"role": "user", "content": "hi"}], "echo": True},
     "echo: is not supported by chat completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
      "max_completion_tokens": 2}, "max_completion_tokens: set it or max_tokens"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role: expected 'user'"),
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     "stream_options: needs stream: true"),
])
def test_bad_chat_requests_name_the_field(base_url, body, needle):
    status, got = http(base_url, "POST", "/v1/chat/completions", {"model": MODEL} | body)
    assert status == 400, got
    assert needle in got["error"]["message"]


def test_an_sdk_history_nulls_and_a_lone_surrogate_as_clients_send_them(base_url, client):
    """A reply's `message.model_dump()` replayed in `messages` (400 "unknown field
    'messages.1.refusal'" before), nulls the SDK sends for None (400 before), and a lone
    surrogate (500 and an ERROR line before): 200, 200, 400 naming the field."""
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True})
    history = [{"role": "user", "content": "Hi"}, first.choices[0].message.model_dump(),
               {"role": "user", "content": "And then?"}]
    assert history[1]["refusal"] is None and history[1]["tool_calls"] is None
    again = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4,
                                           temperature=0, n=None, presence_penalty=None,
                                           frequency_penalty=None, logprobs=None, seed=None)
    assert again.choices[0].finish_reason in ("length", "stop")
    nulls = {"n": None, "echo": None, "logprobs": None, "stream": None, "stop": None,
             "best_of": None, "user": None, "stream_options": None, "logit_bias": None}
    status, got = http(base_url, "POST", "/v1/completions",
                       {"model": MODEL, "prompt": "hi", "max_tokens": 2} | nulls)
    assert status == 200 and got["usage"]["completion_tokens"] == 2, got
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    status, got = http(base_url, "POST", "/v1/chat/completions", raw)
    assert status == 400 and got["error"]["param"] == "messages[0].content", got
    assert "lone surrogate" in got["error"]["message"]


def test_model_cards_head_health_and_error_codes(base_url, client):
    assert client.models.retrieve(MODEL).id == MODEL                  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, got = http(base_url, "POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"})
    assert status == 404 and got["error"]["code"] == "model_not_found"
    status, got = http(base_url, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi",
                                                             "max_tokens": 0})
    assert status == 400 and got["error"]["param"] == "max_tokens"
    status, got = http(base_url, "GET", "/v1/completions")
    assert status == 405 and got["error"]["type"] == "invalid_request_error"
    req = urllib.request.Request(base_url + "/health", method="HEAD")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    req = urllib.request.Request(base_url + "/v1/completions", data=b"model=x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:                   # curl -d, no header
        urllib.request.urlopen(req, timeout=30)
    assert "Content-Type: application/json" in json.loads(e.value.read())["error"]["message"]


def test_malformed_json_is_a_400_and_the_server_answers_after(base_url, client):
    status, got = http(base_url, "POST", "/v1/completions", b"{not json")
    assert status == 400 and got["error"]["type"] == "invalid_request_error"
    for body, needle in [(b"", "body: a JSON object is required"), (b"[1]", "body: ")]:
        status, got = http(base_url, "POST", "/v1/completions", body)    # found by fuzzing
        assert status == 400 and got["error"]["message"].startswith(needle), got
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=-2)
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert ok.choices[0].text is not None


def test_readme_openai_code_runs(base_url, readme_code, monkeypatch, capsys):
    monkeypatch.setenv("MIXTRAL_EP_URL", base_url)
    code = readme_code("OpenAI-compatible HTTP API")
    exec(compile(code, "README.md (OpenAI-compatible HTTP API)", "exec"), {})
    assert capsys.readouterr().out.strip()


# ---- issue 21: the values equal the in-process engine's (tiny, fp32) -------------------------
def _log_softmax(reference, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(reference.logits(ids), dim=-1)                       # (T, V)


def test_echo_and_prompt_logprobs_equal_the_engines_logits(client, reference):
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 0) and vLLM's
    prompt_logprobs: each prompt token's logprob and alternatives are the engine's."""
    prompt = "The quick brown fox jumps"
    ids = reference.tokenizer.encode(prompt)
    want = _log_softmax(reference, ids)
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=3,
                  extra_body={"prompt_logprobs": 3})
    got = client.completions.create(**kwargs)
    [choice] = got.choices
    assert choice.text == prompt and choice.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert "".join(lp.tokens) == prompt and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(
        [want[i - 1, t].item() for i, t in enumerate(ids) if i], abs=1e-4)
    scored = choice.model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    for i, entry in enumerate(scored[1:], 1):
        values, top = want[i - 1].topk(3)
        assert entry[str(ids[i])]["logprob"] == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-4)
        rank = int((want[i - 1] > want[i - 1, ids[i]]).sum()) + 1
        assert abs(entry[str(ids[i])]["rank"] - rank) <= 1      # near-ties: the last bits
        for rank, (v, t) in enumerate(zip(values.tolist(), top.tolist()), 1):
            assert entry[str(t)]["rank"] == rank
            assert entry[str(t)]["logprob"] == pytest.approx(v, abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(values[0].item(), abs=1e-4)
    [streamed] = list(client.completions.create(stream=True, **kwargs))
    assert streamed.choices[0].text == prompt
    assert streamed.choices[0].logprobs.token_logprobs == lp.token_logprobs


def test_top_logprobs_equal_the_engines_logits_streamed_and_unary(client, reference):
    messages = [{"role": "user", "content": "Name a colour"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=4, extra_body={"return_token_ids": True, "ignore_eos": True})
    unary = client.chat.completions.create(**kwargs)
    prompt, gen = reference.tokenizer.apply_chat_template(messages), unary.choices[0].token_ids
    want = _log_softmax(reference, prompt + gen)[len(prompt) - 1:-1]               # (6, V)
    content = unary.choices[0].logprobs.content
    for entry, row, token in zip(content, want, gen, strict=True):
        values, top = row.topk(4)
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert [bytes(a.bytes) for a in entry.top_logprobs] == \
            [reference.tokenizer.token_bytes(t) for t in top.tolist()]
    streamed = [e for c in client.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    echoed = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0,
                                       echo=True, logprobs=2, stream=True)
    tops = [t for c in echoed for t in c.choices[0].logprobs.top_logprobs]
    assert tops[0] is None and all(len(t) in (1, 2, 3) for t in tops[1:])


def test_n_seeded_choices_are_the_engines_and_choice_0_is_n_1(client, reference):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                  seed=11, extra_body={"return_token_ids": True, "ignore_eos": True})
    two = client.completions.create(n=2, **kwargs)
    assert [c.index for c in two.choices] == [0, 1]
    want = reference.generate("Once upon a time", SamplingParams(
        n=2, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True))
    assert [c.token_ids for c in two.choices] == [w.token_ids for w in want]
    assert two.choices[0].token_ids != two.choices[1].token_ids
    assert (two.usage.prompt_tokens, two.usage.completion_tokens) == (len(want[0].prompt_ids), 16)
    again = client.completions.create(n=2, **kwargs)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in two.choices]
    assert client.completions.create(n=1, **kwargs).choices[0].token_ids == two.choices[0].token_ids
    chunks = list(client.completions.create(n=2, stream=True, stream_options={
        "include_usage": True}, **kwargs))
    texts, finished = {0: "", 1: ""}, []
    for c in chunks[:-1]:
        [choice] = c.choices
        texts[choice.index] += choice.text
        finished += [choice.index] if choice.finish_reason else []
    assert texts == {c.index: c.text for c in two.choices} and sorted(finished) == [0, 1]
    assert chunks[-1].usage.completion_tokens == 16
    chat = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=3, seed=3,
        stream=True))
    firsts = {}
    for c in chat:
        firsts.setdefault(c.choices[0].index, c.choices[0].delta.role)
    assert firsts == {0: "assistant", 1: "assistant"}


def test_penalties_bias_and_min_tokens_over_http_equal_the_engine(client, reference):
    ids = reference.tokenizer.encode("Hello there")
    plain = reference.generate([ids], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    bias = {plain[0]: -100.0, plain[3]: 4.0}
    options = dict(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.3,
                   min_tokens=4, stop_token_ids=[plain[2]])
    want = reference.generate([ids], SamplingParams(max_tokens=8, temperature=0,
                                                    logit_bias=bias, **options))[0]
    assert want.token_ids != plain                          # the options change the tokens
    over = {k: options.pop(k) for k in ("repetition_penalty", "min_tokens", "stop_token_ids")}
    got = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=8, temperature=0, **options,
        logit_bias={str(k): v for k, v in bias.items()},
        extra_body={"return_token_ids": True, **over})
    assert got.choices[0].token_ids == want.token_ids
    assert got.choices[0].finish_reason == want.finish_reason
