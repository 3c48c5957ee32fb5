"""Fuzzing a live server: generated GenerateRequests over gRPC (hypothesis), generated OpenAI
requests from the server's own OpenAPI document (schemathesis), and raw malformed bytes to both
ports. Every answer is a success or a client error naming the field: never INTERNAL / 500, a
crash or a hang; and the server answers normally afterwards.

    make test                                          # MIXTRAL_EP_FUZZ_EXAMPLES=60 each
    MIXTRAL_EP_FUZZ_EXAMPLES=10000 MIXTRAL_EP_FUZZ_HTTP_EXAMPLES=2500 \
        python -m pytest -q tests/e2e/test_fuzz.py     # the full run: 10,000 gRPC requests,
                                                       # 2,500 per OpenAI operation

Valid requests generate few tokens (max_tokens 1-8, or unset: 16), so the run goes fast;
max_tokens past the context is generated too (refused)."""
from __future__ import annotations

import json
import logging
import os
import socket
import urllib.error
import urllib.request

import grpc
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.serving import openai_api as oai
from protos import generator_pb2 as pb

log = logging.getLogger(__name__)

MODEL = "tiny"                  # the shared app's (tests/e2e/conftest.py: TINY_MODEL)
EXAMPLES = int(os.environ.get("MIXTRAL_EP_FUZZ_EXAMPLES", "60"))
INT32, INT64 = 2**31, 2**63
# every INVALID_ARGUMENT / 400 message names one of these
FIELDS = ("prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "seed", "stop", "logprobs", "top_logprobs", "model", "n", "body", "JSON",
          "field", "penalty", "echo", "suffix", "best_of", "logit_bias", "tools", "tool_choice",
          "response_format", "stream_options", "user", "ignore_eos", "return_token_ids",
          "stream", "parallel_tool_calls")
HTTP_EXAMPLES = int(os.environ.get("MIXTRAL_EP_FUZZ_HTTP_EXAMPLES", str(EXAMPLES)))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tiny_app):
    assert tiny_app.model == MODEL
    return tiny_app.stub


def answers_normally(stub) -> None:
    reply = stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=4, temperature=0.0),
                          timeout=60)
    assert len(reply.token_ids) == 4 and reply.finish_reason == "length"


# ---- gRPC: generated GenerateRequests -----------------------------------------------------
texts = st.one_of(st.text(max_size=40),                                  # any unicode
                  st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8),
                            st.integers(1, 60_000)))                     # huge (to ~1.9 MB)
numbers = st.one_of(st.none(), st.floats(width=32, allow_nan=True, allow_infinity=True))
wild = st.builds(
    pb.GenerateRequest,
    prompt=st.one_of(st.just(""), texts),
    messages=st.lists(st.builds(pb.ChatMessage, role=st.one_of(
        st.sampled_from(["system", "user", "assistant"]), st.text(max_size=12)),
        content=st.text(max_size=60)), max_size=300),
    max_tokens=st.one_of(st.none(), st.integers(-INT32, 0), st.integers(1, 8),
                         st.integers(5000, INT32 - 1)),
    temperature=numbers, top_p=numbers,
    top_k=st.one_of(st.none(), st.integers(-INT32, INT32 - 1)),
    seed=st.one_of(st.none(), st.integers(-INT64, INT64 - 1)),
    stop=st.lists(st.one_of(st.text(max_size=30), st.text(min_size=1000, max_size=1100)),
                  max_size=40),
    logprobs=st.booleans())
# requests that should succeed (mostly), so the engine's side is fuzzed too
unit = st.floats(min_value=0, max_value=1, exclude_min=True)
valid = st.builds(
    pb.GenerateRequest,
    prompt=st.text(min_size=1, max_size=200),
    max_tokens=st.one_of(st.none(), st.integers(1, 8)),
    temperature=st.one_of(st.none(), st.floats(0, 5)), top_p=st.one_of(st.none(), unit),
    top_k=st.one_of(st.none(), st.integers(0, 40000)),
    seed=st.one_of(st.none(), st.integers(-INT64, INT64 - 1)),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=16), logprobs=st.booleans())
valid_chat = st.builds(
    pb.GenerateRequest,
    messages=st.lists(st.builds(pb.ChatMessage, role=st.just("user"),
                                content=st.text(min_size=1, max_size=100)), min_size=1, max_size=1),
    max_tokens=st.integers(1, 8), temperature=st.one_of(st.none(), st.floats(0, 2)))
requests = st.one_of(wild, valid, valid_chat)


def test_generated_grpc_requests_get_ok_or_invalid_argument(server):
    seen = {}

    @FUZZ
    @given(request=requests)
    def one(request):
        try:
            reply = server.Generate(request, timeout=60)
            assert reply.finish_reason in ("length", "stop")
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, e.details(), request)
            assert any(f in e.details() for f in FIELDS), e.details()
        seen[code] = seen.get(code, 0) + 1

    one()
    log.info("gRPC fuzz: %s", {c.name: n for c, n in seen.items()})
    assert seen.get(grpc.StatusCode.OK) and seen.get(grpc.StatusCode.INVALID_ARGUMENT)
    answers_normally(server)


# ---- HTTP: schemathesis from the server's OpenAPI document --------------------------------
@pytest.fixture(scope="module")
def openapi(server, http_port):
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{http_port}/openapi.json")


schema = schemathesis.pytest.from_fixture("openapi")


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request):
    """schemathesis (4.32.5 and older) reads and renames `request.node._nodeid`, a private
    attribute that pytest 9.2 replaced by a structured id (pytest-dev/pytest#14758): without it
    the OpenAI fuzz test fails with AttributeError before it generates a case. Give the node the
    old attribute back; drop this once schemathesis reads the public `node.nodeid`. (Its Python
    API without the pytest plugin, `operation.as_strategy`, would lose the coverage phase: about
    500 of the ~700 cases this test sends.)"""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(FUZZ, max_examples=HTTP_EXAMPLES)
def test_generated_openai_requests_get_success_or_a_named_client_error(case, server):
    if isinstance(case.body, dict):
        case.body["model"] = MODEL               # another name is a 404 before anything else
        if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
            case.body["max_tokens"] = 4          # chat's default is the rest of the context
    response = case.call(timeout=60)
    allowed = (200, 400, 405) + ((404,) if "{model}" in case.operation.path else ())  # a card
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code == 400:
        error = response.json()["error"]
        assert any(f in error["message"] for f in FIELDS), error
    content_type = response.headers.get("content-type") or [""]   # schemathesis: a list
    if content_type[0].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]


# ---- HTTP: requests as OpenAI clients send them (issue 20, item 9) --------------------------
# nulls in any nullable field, lone surrogates in any string, SDK-replayed histories
NULLABLE = {chat: sorted((set(model.model_fields) | oai.NULL_ONLY)
                         - {"model", "prompt", "messages", "max_tokens"})  # chat's: the context
            for chat, model in [(True, oai.ChatCompletionRequest), (False, oai.CompletionRequest)]}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)


@st.composite
def sdk_assistant_message(draw) -> dict:
    """An assistant reply as `message.model_dump()` replays it: its extras null (or empty)."""
    return {"role": "assistant", "content": draw(words),
            "refusal": draw(st.sampled_from([None, ""])),
            "tool_calls": draw(st.sampled_from([None, [], [dict(TOOL_CALL)]])),
            "function_call": None, "audio": None, "annotations": draw(st.sampled_from([None, []]))}


@st.composite
def client_bodies(draw) -> dict:
    """A valid chat or completions request, then a client's habits: nulls, SDK histories."""
    chat = draw(st.booleans())
    if chat:
        messages = []
        for _ in range(draw(st.integers(0, 2))):
            messages += [{"role": "user", "content": draw(words)}, draw(sdk_assistant_message())]
        last = draw(st.one_of(words, st.lists(st.builds(lambda t: {"type": "text", "text": t},
                                                        words), min_size=1, max_size=3)))
        body = {"messages": messages + [{"role": "user", "content": last, "name": None}]}
    else:
        body = {"prompt": draw(words), "stop": draw(st.sampled_from([None, "\n\n", ["x", "y"]]))}
    body |= {"model": MODEL, "max_tokens": draw(st.integers(1, 4))}
    return body | {field: None for field in draw(st.sets(st.sampled_from(NULLABLE[chat])))}


def _string_paths(value, path: str = ""):
    """(path, parent, key) of every string value in a JSON value, paths as the server names
    them (`messages[1].content[0].text`)."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        name = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        if isinstance(item, str):
            yield name, value, key
        elif isinstance(item, (dict, list)):
            yield from _string_paths(item, name)


def _expected(body: dict, surrogate_at: str | None) -> tuple[int, str | None]:
    """(status, the field its 400 must name) of a client_bodies body."""
    if surrogate_at is not None:
        return 400, surrogate_at
    for i, message in enumerate(body.get("messages", ())):
        if message.get("tool_calls"):       # read since issue 22: its content must be empty
            return 400, f"messages[{i}].content"
    return 200, None


def test_openai_requests_as_clients_send_them(server, http_port):
    """Every answer is 200, or a 400 naming the very field at fault: a null is the default, a
    replayed SDK message is a message, a lone surrogate anywhere is refused by its path."""
    url = f"http://127.0.0.1:{http_port}"
    seen = {}

    @FUZZ
    @given(body=client_bodies(), data=st.data(), surrogate=st.integers(0xD800, 0xDFFF))
    def one(body, data, surrogate):
        body, where = json.loads(json.dumps(body)), None       # its own copy, to edit
        if data.draw(st.booleans()):                 # a lone surrogate in one of its strings
            where, parent, key = data.draw(st.sampled_from(list(_string_paths(body))))
            at = data.draw(st.integers(0, len(parent[key])))
            parent[key] = parent[key][:at] + chr(surrogate) + parent[key][at:]
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, reply = _post(url + path, json.dumps(body).encode())    # "\ud800" escapes
        want, field = _expected(body, where)
        assert status == want, (status, reply, body)
        if field is not None:
            assert reply["error"]["param"] == field, reply
            assert reply["error"]["message"].startswith(field + ":"), reply
        seen[status] = seen.get(status, 0) + 1

    one()
    log.info("OpenAI client-shaped fuzz: %s", seen)
    assert seen.get(200) and seen.get(400)
    answers_normally(server)


def _post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- raw bytes ------------------------------------------------------------------------------
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@settings(max_examples=max(50, EXAMPLES // 20), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(junk=st.binary(max_size=4096), prefix=st.sampled_from(
    [b"", H2_PREFACE, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
     b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00"]),             # HTTP/2, HTTP/1, TLS hello
       port=st.sampled_from(["grpc", "http"]))
def test_malformed_bytes_on_both_ports(server, grpc_port, http_port, junk, prefix, port):
    with socket.create_connection(("127.0.0.1", grpc_port if port == "grpc" else http_port),
                                  timeout=10) as s:
        try:
            s.sendall(prefix + junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):                 # whatever it answers, it must close
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass


def test_the_server_answers_normally_after_the_fuzzing(server, http_port):
    answers_normally(server)
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=30) as resp:
        assert resp.status == 200
