"""actors/serving/openai_api.py and openai_responses.py without a server: request models
(strict types, unknown fields), their translation to engine inputs (defaults, limits), and
response bodies; the HTTP app's OpenAPI schema. tests/e2e/test_openai.py has the same through
Serve's HTTP proxy with the official client."""
from __future__ import annotations

import json
import re

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.info import EngineInfo
from actors.serving import openai_api as oai
from actors.serving import openai_responses as responses
from model.errors import InvalidRequest, lone_surrogate_at
from model.output import Completion, StreamChunk
from model.tokenizer import Tokenizer

INFO = EngineInfo(context_length=256, vocab_size=32000, num_layers=2, num_experts=8,
                  experts_per_token=2, frontend_node_id="head", experts={}, free_blocks=1,
                  total_blocks=1, retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()


@pytest.mark.parametrize("body", [
    {"prompt": [1, True, 2]}, {"prompt": ["1", 2]}, {"prompt": "hi", "temperature": "0.5"},
    {"prompt": "hi", "logprobs": False}, {"prompt": "hi", "stream": "yes"},
    {"prompt": "hi", "max_tokens": 2.5}, {"prompt": "hi", "frobnicate": 1},
])
def test_completion_types_are_strict_and_unknown_fields_refused(body):
    with pytest.raises(pydantic.ValidationError):
        oai.CompletionRequest.model_validate({"model": "m"} | body)


def test_ints_still_pass_as_floats():
    r = oai.CompletionRequest.model_validate({"model": "m", "prompt": "hi", "temperature": 1})
    assert r.temperature == 1


def test_default_max_tokens_16_for_completions_the_rest_of_the_context_for_chat(tokenizer):
    ids, params = oai.completion_inputs(oai.CompletionRequest(model="m", prompt="hi"), tokenizer,
                                        INFO)
    assert params.max_tokens == 16
    long = oai.CompletionRequest(model="m", prompt=list(range(3, 3 + 250)))
    assert oai.completion_inputs(long, tokenizer, INFO)[1].max_tokens == 256 - 250
    chat = oai.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    ids, params = oai.chat_inputs(chat, tokenizer, INFO)
    assert params.max_tokens == INFO.context_length - len(ids)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(stop=["x"] * 17), "stop must hold at most 16 strings"),
    (dict(stop="y" * 1025), "of at most 1024 characters"),
    (dict(n=17), r"n must be an integer in \[1, 16\], got 17"),
    (dict(top_k=-2), "top_k must be"),
])
def test_limits_name_the_field(tokenizer, kwargs, needle):
    with pytest.raises(InvalidRequest, match=needle):
        oai.completion_inputs(oai.CompletionRequest(model="m", prompt="hi", **kwargs), tokenizer,
                              INFO)


def test_vllms_top_k_minus_one_is_no_cut(tokenizer):
    r = oai.CompletionRequest(model="m", prompt="hi", top_k=-1)
    assert oai.completion_inputs(r, tokenizer, INFO)[1].top_k == 0


def test_top_logprobs_needs_logprobs(tokenizer):
    r = oai.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                  top_logprobs=0)
    with pytest.raises(InvalidRequest, match="top_logprobs: needs logprobs: true"):
        oai.chat_inputs(r, tokenizer, INFO)


def test_another_models_name_is_model_not_found():
    with pytest.raises(oai.ModelNotFound, match="this server serves 'm'"):
        oai.check_model(oai.CompletionRequest(model="gpt-4", prompt="hi").model, "m")


def _whole(text, ids, logprobs, finish_reason="length", index=0, **kw) -> Completion:
    return Completion("r", [], list(ids), text, finish_reason, list(logprobs), index=index, **kw)


def _chunk(text, ids, logprobs, finish_reason=None, index=0, **kw) -> StreamChunk:
    return StreamChunk("r", text, list(ids), list(logprobs), finish_reason, index=index, **kw)


def _event(event: str) -> dict:
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[len("data: "):])


def test_whole_and_chunk_bodies(tokenizer):
    shape = responses.Shape(logprobs=True, token_ids=True)
    out = responses.Response(True, "m", tokenizer, shape)
    body = out.whole([_whole("Hi", [1, 2], [-0.5, -1.0])], 3)
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hi"}
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [-0.5, -1.0]
    assert choice["token_ids"] == [1, 2] and body["usage"]["total_tokens"] == 5
    event = out.chunk(_chunk("Hi", [1], [-0.5]))
    assert event.startswith('data: {"id": "chatcmpl-') and '"role": "assistant"' in event
    assert responses.DONE == "data: [DONE]\n\n"


def test_tool_fields_without_tools_are_accepted_and_tools_reach_the_prompt(tokenizer):
    """Issue 22: tools are served (they were refused); without tools the fields change
    nothing, and on this v1 vocabulary `auto` is refused naming tool_choice (model/tools.py)."""
    def chat(**kw):
        return oai.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                         **kw)
    plain = oai.chat_inputs(chat(), tokenizer, INFO)
    for ok in (dict(tool_choice="none"), dict(parallel_tool_calls=True), dict(tools=[])):
        assert oai.chat_inputs(chat(**ok), tokenizer, INFO) == plain
    with pytest.raises(InvalidRequest, match="^tool_choice: 'auto' needs tools"):
        oai.chat_inputs(chat(tool_choice="auto"), tokenizer, INFO)
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(InvalidRequest, match="^tool_choice: 'auto' needs a vocabulary"):
        oai.chat_inputs(chat(tools=tools), tokenizer, INFO)
    ids, params = oai.chat_inputs(chat(tools=tools, tool_choice="required"), tokenizer, INFO)
    assert len(ids) > len(plain[0]) and params.constraint.field == "tool_choice"


@settings(max_examples=300, deadline=None)
@given(data=st.data(), chunk=st.integers(1, 5))
def test_logprob_tokens_spell_the_completion(tokenizer, data, chunk):
    """Joined, the logprob tokens' bytes are the completion's text (the detokenizer's, after a
    prompt: leading spaces kept); text_offset counts its characters, across stream chunks."""
    prompt = tokenizer.encode("Once upon")
    # as a model might generate: any token but the controls (0-2), byte tokens (3-258) likelier
    token = st.one_of(st.integers(3, 258), st.integers(3, tokenizer.vocab_size - 1))
    ids = data.draw(st.lists(token, max_size=24))
    stream = tokenizer.detokenizer(prompt)
    deltas = [stream.push(t) for t in ids]
    text = "".join(deltas) + stream.flush()
    chat = responses.Response(True, "m", tokenizer, responses.Shape(logprobs=True))
    whole = chat.whole([_whole(text, ids, [-1.0] * len(ids))], 3)
    content = whole["choices"][0]["logprobs"]["content"]
    if "\ufffd" not in text:                 # (invalid bytes: one U+FFFD each in the text)
        assert bytes(b for e in content for b in e["bytes"]).decode() == text
    whole_chars = [not e["token"].startswith("bytes:") for e in content]
    assert all(e["token"] == bytes(e["bytes"]).decode()
               for e, ok in zip(content, whole_chars) if ok)

    out = responses.Response(False, "m", tokenizer, responses.Shape(logprobs=True), prompt)
    offsets, tokens = [], []
    for i in range(0, len(ids), chunk):                          # a stream, `chunk` ids a time
        event = _event(out.chunk(_chunk("", ids[i:i + chunk], [-1.0] * len(ids[i:i + chunk]))))
        offsets += event["choices"][0]["logprobs"]["text_offset"]
        tokens += event["choices"][0]["logprobs"]["tokens"]
    # the offset of token i is where its text starts: the text before it is what its
    # predecessors' deltas (the detokenizer's) spelled
    assert offsets == [len("".join(deltas[:i])) for i in range(len(ids))]
    assert tokens == [e["token"] for e in content]


def test_logprob_tokens_of_a_byte_spelled_character(tokenizer):
    """A character spelled with byte tokens: each byte's token is "bytes:\\x..", as OpenAI
    writes it, and the character's offset comes after its last byte."""
    ids = tokenizer.encode("𝄞")[2:]                  # "▁", then 4 byte tokens
    data = [tokenizer.token_bytes(t) for t in ids]
    assert len(ids) == 4 and b"".join(data).decode() == "𝄞"
    out = responses.Response(False, "m", tokenizer, responses.Shape(logprobs=True),
                             tokenizer.encode("a"))
    lp = out.whole([_whole("x", ids + ids, [0.0] * 2 * len(ids))], 1)["choices"][0]["logprobs"]
    assert lp["tokens"][:4] == ["bytes:\\xf0", "bytes:\\x9d", "bytes:\\x84", "bytes:\\x9e"]
    assert lp["text_offset"] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("message, param", [
    ("max_tokens must be in [1, 200]", "max_tokens"),
    ("messages[0].role: expected 'user'", "messages[0].role"),
    ("n: only 1 is supported", "n"), ("stop must hold at most 16 strings", "stop"),
    ("set exactly one of prompt and messages", None), ("the body is not valid JSON", None),
])
def test_a_400_names_its_leading_field_in_param(message, param):
    assert responses.error_body(400, message)["error"]["param"] == param


def test_developer_role_store_and_empty_prompt(tokenizer):
    def chat(**kw):
        return oai.ChatCompletionRequest(model="m", **{"messages": [
            {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]} | kw)
    as_system = oai.chat_inputs(chat(metadata={"k": "v"}, store=False), tokenizer, INFO)[0]
    system = oai.ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert as_system == oai.chat_inputs(system, tokenizer, INFO)[0]
    with pytest.raises(InvalidRequest, match="store: is not supported"):
        oai.chat_inputs(chat(store=True), tokenizer, INFO)
    for empty in ("", [], [""]):
        with pytest.raises(InvalidRequest, match="^prompt: must not be empty"):
            oai.completion_inputs(oai.CompletionRequest(model="m", prompt=empty), tokenizer, INFO)


def test_the_openapi_schema_builds_without_a_warning():
    """GET and HEAD /health on one route gave both operations one operation id, and FastAPI
    warned of the duplicate when it built the schema (/docs, /openapi.json)."""
    import warnings

    from actors.serving.gateway import Gateway  # noqa: F401 - serve.ingress binds the routes
    from actors.serving.http_app import openai_app
    openai_app.openapi_schema = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = openai_app.openapi()["paths"]
    assert set(paths["/health"]) == {"get", "head"}
    operation_ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_a_streams_last_event_ends_its_body():
    """`data: [DONE]` goes out with more_body False: a client that closes once it has read it
    (the OpenAI SDK's sync client) is not reported by Serve's proxy as a disconnect."""
    import asyncio

    from actors.serving.http_app import EventStream

    async def events():
        yield responses.sse({"choices": []})
        yield responses.DONE

    async def run() -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            await asyncio.sleep(3600)
        scope = {"type": "http", "asgi": {"spec_version": "2.0"}}
        await EventStream(events())(scope, receive, send)
        return sent

    start, *bodies = asyncio.run(run())
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert [(m["body"], m["more_body"]) for m in bodies] == [
        (responses.sse({"choices": []}).encode(), True), (responses.DONE.encode(), False)]
    assert dict(start["headers"])[b"content-type"].startswith(b"text/event-stream")


def test_every_route_is_a_method_of_the_deployment_class():
    """serve.ingress rewrites a route method's signature to inject the replica; only the
    deployment's own class travels by value with that rewrite. A route inherited from an
    importable class is pickled by reference, and the replica answered every call with 400
    "query.self: Field required"."""
    from ray.serve._private.http_util import _walk_fastapi_routes  # as serve.ingress walks

    from actors.serving.gateway import Gateway  # noqa: F401 - serve.ingress binds the routes
    from actors.serving.http_app import openai_app
    routes = [route for route, _, _ in _walk_fastapi_routes(openai_app)]
    assert {r.path for r in routes} >= {"/health", "/v1/models", "/v1/completions",
                                        "/v1/chat/completions"}
    assert all(r.endpoint.__qualname__.startswith("Gateway.") for r in routes), [
        r.endpoint.__qualname__ for r in routes]


def test_every_routes_annotations_are_objects():
    """Serve pickles the deployment's class by value, and a copied method's globals hold only
    the names its code uses: a string annotation ("oai.CompletionRequest") did not resolve in
    the replica, the body became a query parameter, and every POST answered 400
    "query.request: Field required"."""
    import inspect

    from ray.serve._private.http_util import _walk_fastapi_routes

    from actors.serving.gateway import Gateway  # noqa: F401 - serve.ingress binds the routes
    from actors.serving.http_app import openai_app
    for route, _, _ in _walk_fastapi_routes(openai_app):
        hints = inspect.get_annotations(route.endpoint)
        assert not any(isinstance(h, str) for h in hints.values()), (route.path, hints)


# ---- inputs as clients send them (issue 20, item 9) ---------------------------------------
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
# every field a client may send as null, meaning its default (the OpenAI SDK's nullable ones)
NULLABLE = sorted((oai.REQUEST_FIELDS | oai.NULL_ONLY) - {"model", "prompt", "messages"})


@settings(max_examples=200, deadline=None)
@given(chat=st.booleans(), nulls=st.sets(st.sampled_from(NULLABLE)))
def test_null_is_the_default(tokenizer, chat, nulls):
    """`"n": null`, `"stream": null`, `"echo": null`... read as the field unset: the same
    request, the same engine inputs (they were 400 "Input should be a valid integer")."""
    model, base = (oai.ChatCompletionRequest, CHAT) if chat else (oai.CompletionRequest,
                                                                   COMPLETION)
    fields = set(model.model_fields) | oai.NULL_ONLY
    with_nulls = model.model_validate(base | {f: None for f in nulls & fields})
    assert with_nulls == model.model_validate(base)
    inputs = oai.chat_inputs if chat else oai.completion_inputs
    assert inputs(with_nulls, tokenizer, INFO) == inputs(model.model_validate(base), tokenizer,
                                                         INFO)


def test_null_inside_nested_objects_is_the_default_and_a_required_null_is_refused():
    r = oai.ChatCompletionRequest.model_validate(CHAT | {"stream": True, "stream_options": {
        "include_usage": None}, "messages": [{"role": "user", "content": "hi", "name": None}]})
    assert r.stream_options.include_usage is False and r.messages[0].name is None
    for field in ("model", "prompt"):
        with pytest.raises(pydantic.ValidationError) as e:
            oai.CompletionRequest.model_validate(COMPLETION | {field: None})
        assert e.value.errors()[0]["loc"][0] == field
    with pytest.raises(pydantic.ValidationError, match="unknown_field|Extra inputs"):
        oai.CompletionRequest.model_validate(COMPLETION | {"service_tier": "flex"})


def _sdk_assistant_message(content: str) -> dict:
    """An assistant reply as the `openai` SDK replays it: `message.model_dump()`."""
    openai_types = pytest.importorskip("openai.types.chat")
    return openai_types.ChatCompletionMessage(role="assistant", content=content).model_dump()


def test_an_sdk_replayed_history_is_accepted_and_its_extras_ignored(tokenizer):
    """`reply.choices[0].message.model_dump()` back in `messages` carries refusal, tool_calls,
    function_call, audio and annotations as null: 400 "unknown field 'messages.1.refusal'"
    before."""
    replayed = _sdk_assistant_message("Hello!")
    assert {"refusal", "tool_calls", "function_call", "audio", "annotations"} <= set(replayed)
    turns = [{"role": "user", "content": "hi"}, replayed, {"role": "user", "content": "more"}]
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "more"}]
    got = oai.chat_inputs(oai.ChatCompletionRequest(model="m", messages=turns), tokenizer, INFO)
    assert got == oai.chat_inputs(oai.ChatCompletionRequest(model="m", messages=plain),
                                  tokenizer, INFO)
    empty = replayed | {"refusal": "", "tool_calls": [], "annotations": [{"type": "url"}]}
    oai.chat_inputs(oai.ChatCompletionRequest(model="m", messages=[plain[0], empty, plain[2]]),
                    tokenizer, INFO)


@pytest.mark.parametrize("extra, field", [
    ({"function_call": {"name": "f", "arguments": "{}"}}, "messages[1].function_call"),
    ({"audio": {"id": "a"}}, "messages[1].audio"),
    ({"refusal": "I can't."}, "messages[1].refusal"),
])
def test_a_non_empty_function_call_audio_or_refusal_is_refused_by_name(tokenizer, extra, field):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"} | extra,
             {"role": "user", "content": "ok"}]
    with pytest.raises(InvalidRequest, match=f"^{re.escape(field)}: only null or empty"):
        oai.chat_inputs(oai.ChatCompletionRequest(model="m", messages=turns), tokenizer, INFO)
    assert responses.error_body(400, f"{field}: x")["error"]["param"] == field


def test_text_parts_are_joined_with_a_newline_as_vllm_joins_them(tokenizer):
    parts = [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]
    as_parts = oai.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts}])
    as_text = oai.ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": "Line one.\nLine two."}])
    assert oai.chat_inputs(as_parts, tokenizer, INFO) == oai.chat_inputs(as_text, tokenizer, INFO)


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "developer", "content": "Be brief."}],
     "messages[0].role: the last message must be from 'user', got 'developer'"),
    ([{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}],
     "messages[1].role: a developer message may only be the first message"),
])
def test_a_developer_message_is_named_as_sent(tokenizer, messages, needle):
    with pytest.raises(InvalidRequest) as e:
        oai.chat_inputs(oai.ChatCompletionRequest(model="m", messages=messages), tokenizer, INFO)
    assert str(e.value).startswith(needle)


# where a client's string goes: (body, the path of the string the surrogate goes into)
STRING_FIELDS = [
    (COMPLETION, "prompt"), (COMPLETION | {"prompt": ["hi"]}, "prompt[0]"),
    (COMPLETION, "model"), (COMPLETION | {"stop": ["a", "b"]}, "stop[1]"),
    (COMPLETION | {"stop": "a"}, "stop"), (COMPLETION | {"user": "u"}, "user"),
    (COMPLETION | {"suffix": "s"}, "suffix"), (CHAT, "messages[0].content"),
    (CHAT, "messages[0].role"),
    (CHAT | {"messages": [{"role": "user", "content": [{"type": "text", "text": "t"}]}]},
     "messages[0].content[0].text"),
    (CHAT | {"messages": [{"role": "user", "content": "c", "name": "n"}]}, "messages[0].name"),
    (CHAT | {"metadata": {"k": "v"}}, "metadata.k"),
    (CHAT | {"tool_choice": "none"}, "tool_choice"),
]


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(STRING_FIELDS), at=st.integers(0, 3),
       surrogate=st.integers(0xD800, 0xDFFF).map(chr))
def test_a_lone_surrogate_in_any_string_is_a_400_naming_where(case, at, surrogate):
    """`"a\\ud800b"` in the JSON was a 500 and an ERROR line (the tokenizer's "TextInputSequence
    must be str"), or a 500 when a message quoted it (no UTF-8 spells it)."""
    body, path = case
    body = json.loads(json.dumps(body))

    def put(value, keys):
        key, *rest = keys
        if rest:
            return put(value[key], rest)
        text = value[key]
        value[key] = text[:at] + surrogate + text[at:]
    put(body, [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)])
    model = oai.ChatCompletionRequest if "messages" in body else oai.CompletionRequest
    with pytest.raises(pydantic.ValidationError) as e:
        model.model_validate(body)
    [error] = e.value.errors()
    assert error["type"] == oai.SURROGATE and error["ctx"]["field"] == path
    assert error["msg"].startswith(f"{path}: holds a lone surrogate (U+{ord(surrogate):04X}")
    assert lone_surrogate_at(error["msg"]) is None          # it never quotes the string


@pytest.mark.parametrize("body, field, message", [
    (COMPLETION | {"logit_bias": {"\ud800": 1}}, "logit_bias", "logit_bias (a key): holds"),
    (COMPLETION | {"fr\udc00b": 1}, "body", "body (a key): holds"),
])
def test_a_lone_surrogate_in_a_key_is_named_by_its_object(body, field, message):
    with pytest.raises(pydantic.ValidationError) as e:
        oai.CompletionRequest.model_validate(body)
    assert e.value.errors()[0]["ctx"]["field"] == field
    assert e.value.errors()[0]["msg"].startswith(message)


def test_the_http_400_of_a_lone_surrogate_names_the_field():
    import asyncio

    from fastapi.exceptions import RequestValidationError

    from actors.serving import http_app
    with pytest.raises(pydantic.ValidationError) as e:
        oai.ChatCompletionRequest.model_validate(
            CHAT | {"messages": [{"role": "user", "content": "a\ud800b"}]})
    errors = [err | {"loc": ("body", *err["loc"])} for err in e.value.errors()]
    request = type("R", (), {"headers": {"content-type": "application/json"}})()
    response = asyncio.run(http_app._malformed(request, RequestValidationError(errors)))
    body = json.loads(response.body)
    assert response.status_code == 400 and body["error"]["param"] == "messages[0].content"
    assert body["error"]["message"].startswith("messages[0].content: holds a lone surrogate")


def test_the_in_process_engines_checks_refuse_a_lone_surrogate_too(tokenizer):
    """The siblings under HTTP: the admission check (Engine, RayEngine) and the chat rules."""
    from model import admission
    with pytest.raises(InvalidRequest, match="^prompt: holds a lone surrogate"):
        admission.prompt_ids("a\ud800b", tokenizer, 32000, 256)
    with pytest.raises(InvalidRequest, match=r"^messages\[0\]\.content: holds a lone surrogate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "\udfff"}])
