"""Issue 22 over gRPC, with the real client through Serve's proxy on the shared tiny app (random
weights, v1 vocabulary): json_schema outputs validate (jsonschema), regex outputs match, choice
outputs are one of the choices, a required tool call's arguments validate against the tool's
parameters, streamed equals unary (seeded), the CLI's flags reach the server, and a schema that
does not compile is INVALID_ARGUMENT naming json_schema before any message.
tests/unit/test_grpc_structured.py has the translation without Ray."""
from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest
from ray import serve

from protos import generator_pb2 as pb

# schemas whose documents random weights finish within MAX_TOKENS: every string bounded
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "tags": {"type": "array", "maxItems": 2, "items": {
                                          "enum": ["a", "b", "c"]}}},
     "required": ["ok", "tags"], "additionalProperties": False},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
                                                                "maximum": 9}},
                         "required": ["x"], "additionalProperties": False}},
     "type": "array", "minItems": 1, "maxItems": 2, "items": {"$ref": "#/$defs/point"}},
]
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe later"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CHAT = [pb.ChatMessage(role="user", content="What is the weather in Paris?")]
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def server(tiny_app):
    return tiny_app.stub


def request(seed: int, **fields) -> pb.GenerateRequest:
    fields = {"prompt": "Answer:", "temperature": 1.0, **fields}
    return pb.GenerateRequest(max_tokens=MAX_TOKENS, seed=seed, **fields)


def joined(messages) -> tuple[str, list[int], str, list[tuple[str, str, str]]]:
    """(text, token ids, finish reason, tool calls as (id, name, arguments)) of a stream."""
    calls: dict[int, list[str]] = {}
    for m in messages:
        for c in m.tool_calls:
            got = calls.setdefault(c.index, ["", "", ""])
            got[0], got[1], got[2] = got[0] + c.id, got[1] + c.name, got[2] + c.arguments
    return ("".join(m.text for m in messages), [t for m in messages for t in m.token_ids],
            messages[-1].finish_reason, [tuple(calls[i]) for i in sorted(calls)])


def unary_and_streamed(server, req: pb.GenerateRequest) -> pb.GenerateResponse:
    """The Generate response, after checking GenerateStream's messages join to it."""
    out = server.Generate(req, timeout=120)
    text, ids, reason, calls = joined(list(server.GenerateStream(req, timeout=120)))
    assert (text, ids, reason) == (out.text, list(out.token_ids), out.finish_reason)
    # ids are made per response: the calls' names and arguments are the same
    assert [c[1:] for c in calls] == [(c.name, c.arguments) for c in out.tool_calls]
    assert all(len(c[0]) == 9 and c[0].isalnum() for c in calls)
    return out


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum-array", "ref"])
def test_json_schema_outputs_validate(server, schema):
    out = unary_and_streamed(server, request(7, json_schema=json.dumps(schema)))
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), schema)
    assert out.text == json.dumps(json.loads(out.text), ensure_ascii=False)   # its layout


def test_json_object_regex_and_choice_outputs_match(server):
    # a bare object finishes on random weights greedy after "Hello" (`{}`); after other
    # prompts it can run on in an unbounded key
    got = unary_and_streamed(server, request(3, prompt="Hello", json_object=True, temperature=0))
    assert got.finish_reason == "stop" and isinstance(json.loads(got.text), dict), got.text
    regex = unary_and_streamed(server, request(5, regex=REGEX))
    assert re.fullmatch(REGEX, regex.text) and regex.finish_reason == "stop"
    for seed in range(3):
        choice = server.Generate(request(seed, choice=pb.ChoiceConstraint(values=CHOICES)),
                                 timeout=120)
        assert choice.text in CHOICES and choice.finish_reason == "stop"


@pytest.mark.parametrize("tool_choice", ["required", "get_weather"])
def test_a_forced_tool_call_has_arguments_valid_for_its_tool(server, tool_choice):
    req = request(11, prompt="", messages=CHAT, tools=[json.dumps(WEATHER)],
                  tool_choice=tool_choice, parallel_tool_calls=False)
    out = unary_and_streamed(server, req)
    assert out.finish_reason == "tool_calls" and out.text == ""
    [call] = out.tool_calls
    assert call.name == "get_weather" and len(call.id) == 9 and call.id.isalnum()
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("fields, message", [
    (dict(json_schema='{"type": "strin"}'), "json_schema: "),
    (dict(regex="(unclosed"), "regex: "),
    (dict(tools=[json.dumps(WEATHER)], tool_choice="get_time", messages=CHAT, prompt=""),
     "tool_choice"),
], ids=["json_schema", "regex", "tool_choice"])
def test_a_bad_constraint_is_invalid_argument_before_any_message(server, tiny_app, fields,
                                                                 message):
    req = request(1, **fields)
    for call in (server.Generate,
                 lambda r, timeout: list(server.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(req, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(message), err.value.details()
    engine = serve.get_deployment_handle("EngineServer", app_name=tiny_app.name)
    info = engine.info.remote().result(timeout_s=60)
    assert info.free_blocks == info.total_blocks                  # nothing of it was queued


def test_client_cli_sends_a_choice_and_a_tool(server, grpc_port, capsys, tmp_path):
    from protos.client import main
    address = ["--address", f"127.0.0.1:{grpc_port}", "--seed", "2", "--temperature", "1"]
    assert main(["Pick one", "--choice", "yes", "--choice", "no", "--unary", *address]) == 0
    assert capsys.readouterr().out.split("\n")[0] in ("yes", "no")
    tool = tmp_path / "weather.json"
    tool.write_text(json.dumps(WEATHER), encoding="utf-8")
    assert main(["Weather in Paris?", "--tool", f"@{tool}", "--tool-choice", "required",
                 "--no-parallel-tool-calls", "--max-tokens", str(MAX_TOKENS), *address]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[tool_call 0 id=[A-Za-z0-9]{9} get_weather\(\{.*\}\)\]\n", out), out
    assert "[finish_reason=tool_calls " in out
