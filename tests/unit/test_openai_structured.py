"""Structured outputs and tools on the OpenAI HTTP API without a server: `response_format`,
vLLM's `structured_outputs` and `guided_*` to one Constraint (or a 400 naming the field), the
tools' prompt and forcing grammar, and tool calls in OpenAI's whole and streamed shapes
(reassembled by the `openai` SDK's own stream accumulator). tests/e2e/test_openai_structured.py
has the same through Serve with the official client."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json

import jsonschema
import pydantic
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from actors.info import EngineInfo
from actors.serving import openai_api as oai
from actors.serving import openai_responses as responses
from actors.serving import validation
from actors.serving.engine_client import EngineClient
from model.config import PRESETS
from model.constraint import JSON_OBJECT, Constraint
from model.engine import Engine
from model.errors import InvalidRequest
from model.output import Completion, StreamChunk
from model.random_checkpoint import write_random
from model.spm import mistral_common_model
from model.tokenizer import Tokenizer

INFO = EngineInfo(context_length=2048, vocab_size=32000, num_layers=2, num_experts=8,
                  experts_per_token=2, frontend_node_id="head", experts={}, free_blocks=1,
                  total_blocks=1, retries=0)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
# a schema nested past MAX_JSON_DEPTH: as text past json's recursion limit, as an object below it
DEEP_TEXT = '{"type":"array","items":' * 2000 + '{"type":"string"}' + "}" * 2000
DEEP_SCHEMA: dict = {"type": "string"}
for _ in range(200):
    DEEP_SCHEMA = {"type": "array", "items": DEEP_SCHEMA}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()


def _constraint(body: dict, tokenizer) -> Constraint | None:
    if "messages" in body:
        return oai.chat_inputs(oai.ChatCompletionRequest.model_validate(body), tokenizer,
                               INFO)[1].constraint
    return oai.completion_inputs(oai.CompletionRequest.model_validate(body), tokenizer,
                                 INFO)[1].constraint


# (request fields, the constraint they make)
FORMS = [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}},
     Constraint("json", JSON_OBJECT, "response_format")),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "a-b_1", "schema": SCHEMA, "strict": True, "description": "d"}}},
     Constraint.json_schema(SCHEMA, "response_format")),
    ({"structured_outputs": {"json": SCHEMA}}, Constraint.json_schema(SCHEMA, "x")),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, Constraint("json", json.dumps(SCHEMA))),
    ({"structured_outputs": {"regex": "[a-z]+"}}, Constraint("regex", "[a-z]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, Constraint.choice(["yes", "no"], "x")),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, Constraint("grammar", 'start: "a"')),
    ({"structured_outputs": {"json_object": True}}, Constraint("json", JSON_OBJECT)),
    ({"structured_outputs": {"json_object": False}}, None),
    ({"guided_json": SCHEMA}, Constraint.json_schema(SCHEMA, "x")),
    ({"guided_json": json.dumps(SCHEMA)}, Constraint("json", json.dumps(SCHEMA))),
    ({"guided_regex": "[0-9]{3}"}, Constraint("regex", "[0-9]{3}")),
    ({"guided_choice": ["a", "b"]}, Constraint.choice(["a", "b"], "x")),
    ({"guided_grammar": 'start: "b"'}, Constraint("grammar", 'start: "b"')),
]
FIELD = {"response_format": "response_format", "guided_json": "guided_json",
         "guided_regex": "guided_regex", "guided_choice": "guided_choice",
         "guided_grammar": "guided_grammar"}


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("fields, want", FORMS)
def test_each_form_is_one_constraint_named_by_its_field(tokenizer, chat, fields, want):
    got = _constraint((CHAT if chat else COMPLETION) | fields, tokenizer)
    assert got == want
    if want is not None:
        [key] = fields
        inner = fields[key]
        assert got.field == (FIELD.get(key) or f"{key}.{next(iter(inner))}")


def test_an_sdk_parse_request_is_the_pydantic_models_schema(tokenizer):
    """What `client.chat.completions.parse(response_format=Model)` sends (the SDK's own
    conversion): its strict schema, as the constraint."""
    parsing = pytest.importorskip("openai.lib._parsing._completions")

    class Person(pydantic.BaseModel):
        name: str
        tags: list[str]
    sent = parsing.type_to_response_format_param(Person)
    got = _constraint(CHAT | {"response_format": sent}, tokenizer)
    assert json.loads(got.spec) == sent["json_schema"]["schema"]
    assert got.field == "response_format"


ONE_EACH = [fields for fields, want in FORMS if want is not None]


@settings(max_examples=60, deadline=None)
@given(pair=st.lists(st.sampled_from(range(len(ONE_EACH))), min_size=2, max_size=2,
                     unique=True), chat=st.booleans())
def test_two_constraints_are_refused_naming_both(tokenizer, pair, chat):
    a, b = (ONE_EACH[i] for i in pair)
    [key], [other] = a, b
    assume(key != other or (key == "structured_outputs" and a[key].keys() != b[key].keys()))
    body = {key: a[key] | b[key]} if key == other else a | b    # two keys of structured_outputs
    names = [c.field for c in (_constraint((CHAT if chat else COMPLETION) | one, tokenizer)
                               for one in (a, b))]
    with pytest.raises(InvalidRequest) as e:
        _constraint((CHAT if chat else COMPLETION) | body, tokenizer)
    message = str(e.value)
    assert all(name in message for name in names), message
    assert "set one structured-output constraint" in message


@pytest.mark.parametrize("fields, needle", [
    ({"response_format": {"type": "json_schema"}},
     "response_format.json_schema: required with type \"json_schema\""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema: required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b",
                                                                 "schema": SCHEMA}}},
     "response_format.json_schema.name: must be 1 to 64 of a-z"),
    ({"response_format": {"type": "text", "json_schema": {"name": "x", "schema": SCHEMA}}},
     "response_format.json_schema: set only with type \"json_schema\""),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice: choices must be a "
                                             "non-empty list"),
    ({"guided_json": "{not json"}, "guided_json: the JSON schema is not valid JSON"),
    ({"guided_json": "[1]"}, "guided_json: a JSON schema must be an object"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex: the regex constraint "
                                            "must be a non-empty string"),
    ({"guided_grammar": "x" * 70000}, "guided_grammar: the grammar constraint is 70000 "
                                      "characters; the limit is 65536"),
    ({"structured_outputs": {}}, "structured_outputs: set one of json, regex, choice, "
                                 "grammar, json_object"),
    ({"structured_outputs": {"regex": None}}, "structured_outputs: set one of json"),
    ({"structured_outputs": {"json": None}}, "structured_outputs: set one of json"),
    ({"structured_outputs": {"json": None, "regex": None, "choice": None, "grammar": None}},
     "structured_outputs: set one of json"),
    ({"guided_json": DEEP_TEXT}, "guided_json: nested more than 128 levels"),
    ({"structured_outputs": {"json": DEEP_TEXT}}, "structured_outputs.json: nested more than"),
    ({"guided_json": DEEP_SCHEMA}, "guided_json: nested more than 128 levels"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                 "schema": DEEP_SCHEMA}}},
     "response_format: nested more than 128 levels"),
])
def test_a_bad_constraint_is_refused_naming_its_field(tokenizer, fields, needle):
    with pytest.raises(InvalidRequest) as e:
        _constraint(CHAT | fields, tokenizer)
    assert str(e.value).startswith(needle), str(e.value)
    param = responses.error_body(400, str(e.value))["error"]["param"]
    assert param is not None and needle.startswith(param)


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "xml"}}, {"structured_outputs": {"whitespace_pattern": " "}},
    {"structured_outputs": {"regex": 5}}, {"guided_choice": "a"},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
])
def test_malformed_fields_fail_the_request_model(fields):
    with pytest.raises(pydantic.ValidationError) as e:
        oai.ChatCompletionRequest.model_validate(CHAT | fields)
    assert e.value.errors()[0]["loc"][0] == next(iter(fields))


def test_nulls_inside_the_new_objects_are_their_defaults(tokenizer):
    body = CHAT | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": SCHEMA, "strict": None, "description": None}},
        "structured_outputs": None, "guided_regex": None}
    assert _constraint(body, tokenizer) == Constraint.json_schema(SCHEMA, "x")


def test_constraint_of_takes_none_and_one():
    c = Constraint("regex", "a", "guided_regex")
    assert validation.constraint_of() is None
    assert validation.constraint_of(None, c, None) is c
    with pytest.raises(InvalidRequest, match="^guided_regex and tool_choice: "):
        validation.constraint_of(c, Constraint("regex", "b", "tool_choice"))


# ---- tool calls in replies: whole, and streamed as OpenAI streams them ----------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def v3():
    return Tokenizer.from_model_file(mistral_common_model(32768))


def _numbered_parsers(inputs: validation.ToolInputs):
    """A parser factory like inputs.parser, its call ids counted from 0 in each parser (so a
    stream's ids equal a whole reply's)."""
    def parser():
        counter = itertools.count()
        p = inputs.parser()
        p.new_id = lambda: f"call{next(counter):05d}"
        return p
    return parser


def _tool_inputs(tokenizer, choice: str) -> validation.ToolInputs:
    return validation.tools_inputs(tokenizer, 4096, [{"role": "user", "content": "hi"}],
                                   [WEATHER, ADD], choice, True)


def _completion_ids(tokenizer, native: bool, calls: list[dict]) -> list[int]:
    """What a model answering `calls` generates: [TOOL_CALLS] then the list (native), or the
    list alone (v1, forced)."""
    ids = tokenizer.encode(json.dumps(calls, ensure_ascii=False), bos=False)
    return ([tokenizer.control_id("[TOOL_CALLS]")] if native else []) + ids


def _pieces(tokenizer, ids: list[int], cuts: list[int]) -> list[tuple[list[int], str]]:
    """(token ids, text) of each chunk of `ids` cut at `cuts`, text as the engine's
    detokenizer gives it."""
    detok, bounds = tokenizer.detokenizer(), sorted({0, len(ids), *cuts})
    return [(ids[a:b], "".join(detok.push(t) for t in ids[a:b]))
            for a, b in zip(bounds, bounds[1:])]


def _sdk_calls(calls) -> list[dict]:
    """The SDK's reassembled tool calls in our body's shape (less its extra fields)."""
    return [{"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                      "arguments": c.function.arguments}}
            for c in calls or ()]


def _reassembled(events: list[str]):
    """The openai SDK's own reassembly of a chat stream's events (ChatCompletionStreamState,
    what `client.chat.completions.stream()` uses)."""
    streaming = pytest.importorskip("openai.lib.streaming.chat")
    chunk_type = pytest.importorskip("openai.types.chat").ChatCompletionChunk
    state = streaming.ChatCompletionStreamState()
    for event in events:
        state.handle_chunk(chunk_type.model_validate(json.loads(event[len("data: "):])))
    return state.current_completion_snapshot       # (the final one parses: not for "length")


arguments = st.fixed_dictionaries({"city": st.text(min_size=0, max_size=8)}) | \
    st.fixed_dictionaries({"a": st.integers(-999, 999), "b": st.integers(-999, 999)})


@settings(max_examples=60, deadline=None)
@given(native=st.booleans(), data=st.data(),
       calls=st.lists(arguments.map(lambda a: {"name": "get_weather" if "city" in a else "add",
                                                "arguments": a}), min_size=1, max_size=3))
def test_streamed_tool_calls_reassemble_to_the_whole_reply(tokenizer, v3, native, data, calls):
    """Any chunking of a call list (v1 forced, or v3 native after [TOOL_CALLS]): the SDK's
    reassembly of our stream equals our whole reply, whose calls are the generated ones:
    content null, finish_reason "tool_calls", arguments JSON text of the arguments."""
    tok = v3 if native else tokenizer
    inputs = _tool_inputs(tok, "required")
    ids = _completion_ids(tok, native, calls)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(ids) - 1)), max_size=6))
    pieces = _pieces(tok, ids, cuts)
    text = "".join(t for _, t in pieces)
    whole = responses.Response(True, "m", tok, parsers=_numbered_parsers(inputs)).whole(
        [Completion("r", [], ids, text, "stop", [0.0] * len(ids))], 3)
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
           for c in choice["message"]["tool_calls"]]
    assert got == [(c["name"], c["arguments"]) for c in calls]
    out = responses.Response(True, "m", tok, parsers=_numbered_parsers(inputs))
    events = [out.chunk(StreamChunk("r", t, i, [0.0] * len(i),
                                    "stop" if k == len(pieces) - 1 else None))
              for k, (i, t) in enumerate(pieces)]
    streamed = _reassembled(events).choices[0]
    assert streamed.finish_reason == "tool_calls" and not streamed.message.content
    assert _sdk_calls(streamed.message.tool_calls) == choice["message"]["tool_calls"]


def test_n_choices_are_parsed_each_on_its_own(v3):
    """Two choices' chunks interleaved: one answers a call, the other text (tool_choice auto
    on v3); each streamed choice equals its whole one."""
    inputs = _tool_inputs(v3, "auto")
    call = _completion_ids(v3, True, [{"name": "add", "arguments": {"a": 1, "b": 2}}])
    plain = v3.encode("Hello there, no tools.", bos=False)
    per_choice = [_pieces(v3, call, [1, 4, 9]), _pieces(v3, plain, [2, 3])]
    events, out = [], responses.Response(True, "m", v3, parsers=_numbered_parsers(inputs))
    for k in range(max(map(len, per_choice))):
        for index, pieces in enumerate(per_choice):
            if k < len(pieces):
                ids, text = pieces[k]
                last = "stop" if k == len(pieces) - 1 else None
                events.append(out.chunk(StreamChunk("r", text, ids, [0.0] * len(ids), last,
                                                    index=index)))
    streamed = _reassembled(events).choices
    wholes = responses.Response(True, "m", v3, parsers=_numbered_parsers(inputs)).whole(
        [Completion("r", [], ids, "".join(t for _, t in p), "stop", [0.0] * len(ids), index=i)
         for i, (ids, p) in enumerate(zip((call, plain), per_choice))], 3)["choices"]
    assert wholes[0]["finish_reason"] == "tool_calls" and wholes[1]["finish_reason"] == "stop"
    assert wholes[1]["message"] == {"role": "assistant", "content": "Hello there, no tools."}
    for s, w in zip(streamed, wholes):
        assert s.finish_reason == w["finish_reason"]
        assert (s.message.content or None) == w["message"]["content"]
        assert _sdk_calls(s.message.tool_calls) == w["message"].get("tool_calls", [])


def test_a_history_with_tool_calls_and_results_is_the_tools_prompt(v3):
    """An SDK-replayed assistant message with tool_calls (content null) and the tool's result
    in `messages` go to model/tools.py's prompt (they were refused)."""
    turns = [{"role": "user", "content": "Add 1 and 2."},
             {"role": "assistant", "content": None, "tool_calls": [{
                 "id": "abcDEF123", "type": "function",
                 "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
             {"role": "tool", "tool_call_id": "abcDEF123", "content": "3"},
             {"role": "user", "content": "Thanks."}]
    r = oai.ChatCompletionRequest.model_validate(CHAT | {"messages": turns, "tools": [ADD]})
    inputs = oai.chat_request(r, v3, INFO)
    assert inputs.ids == validation.tools_inputs(v3, INFO.context_length, turns, [ADD]).prompt_ids
    assert inputs.tools is not None and inputs.params.constraint is None       # auto: free
    with pytest.raises(InvalidRequest, match=r"^messages\[0\]\.content: required"):
        oai.chat_request(oai.ChatCompletionRequest.model_validate(
            CHAT | {"messages": [{"role": "user", "content": None}]}), v3, INFO)


def _history(arguments: str = "{}", result: str = "3", **call_extra) -> list[dict]:
    return [{"role": "user", "content": "Add 1 and 2."},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "abcDEF123", "type": "function", **call_extra,
                "function": {"name": "add", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": result}]


@pytest.mark.parametrize("fields, needle", [
    ({"messages": _history(arguments="[" * 5000 + "]" * 5000)},
     "messages[1].tool_calls[0].function.arguments: nested more than 128 levels"),
    ({"messages": _history(result="[" * 3000 + "]" * 3000)},
     "messages[2].content: nested more than 128 levels"),
    ({"messages": _history(x=json.loads("[" * 900 + "]" * 900))},
     "messages: nested more than 128 levels"),
    ({"tools": [{"type": "function", "function": {"name": "add", "parameters": DEEP_SCHEMA}}]},
     "tools[0].function.parameters: nested more than 128 levels"),
], ids=["arguments", "result", "call", "parameters"])
def test_client_json_nested_too_deep_is_refused_naming_the_field(v3, fields, needle):
    """JSON text or structures past MAX_JSON_DEPTH in a chat with tools: a 400 naming where,
    never a RecursionError (a 500) from json.loads or json.dumps."""
    body = CHAT | {"messages": _history(), "tools": [ADD], "tool_choice": "required"} | fields
    with pytest.raises(InvalidRequest) as e:
        oai.chat_request(oai.ChatCompletionRequest.model_validate(body), v3, INFO)
    assert str(e.value).startswith(needle), str(e.value)
    assert needle.startswith(responses.error_body(400, str(e.value))["error"]["param"])


# ---- native tool calls through the HTTP layer, on an in-process tiny-v3 engine ---------------
class _Stream:
    """An in-process engine stream as EngineClient.stream returns one (with cancel())."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.chunks.__anext__()

    def cancel(self):
        pass


class _LocalEngine:
    """What http_app.completion needs of an EngineClient, over an in-process Engine: no Ray,
    the real grammar check."""
    model_name = "m"
    check = EngineClient.check

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, engine.tokenizer

    async def info(self):
        return dataclasses.replace(INFO, vocab_size=self.engine.cfg.vocab_size)

    def stream(self, ids, params):
        return _Stream(self.engine.stream(ids, params))


@pytest.fixture(scope="module")
def v3_engine(tmp_path_factory):
    """The tiny-v3 preset (v3 vocabulary: [TOOL_CALLS] is a control token), in process."""
    path = write_random(PRESETS["tiny-v3"], tmp_path_factory.mktemp("tiny-v3"), seed=0)
    return _LocalEngine(Engine.from_pretrained(path))


BOUNDED_ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}


def _http(engine, body: dict):
    """(status, the body or the list of event bodies) of a chat request through http_app."""
    from actors.serving.http_app import completion

    async def run():
        request = oai.ChatCompletionRequest.model_validate({"model": "m"} | body)
        response = await completion(engine, request, chat=True)
        if not body.get("stream"):
            return response.status_code, json.loads(response.body)
        return response.status_code, [e async for e in response.body_iterator]
    return asyncio.run(run())


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "add"}}])
def test_native_forced_calls_through_the_http_layer(v3_engine, tool_choice):
    """The v3 path whole: mistral-common's prompt with tools, the grammar forcing
    [TOOL_CALLS] and the list, the engine, the parser: n = 2 choices of calls whose arguments
    validate, and the SDK's reassembly of the stream equals the unary reply (seeded)."""
    body = {"messages": [{"role": "user", "content": "Add 2 and 3."}], "tools": [BOUNDED_ADD],
            "tool_choice": tool_choice, "seed": 3, "n": 2, "max_tokens": 80}
    status, whole = _http(v3_engine, body)
    assert status == 200, whole
    status, events = _http(v3_engine, body | {"stream": True})
    streamed = _reassembled(events[:-1]).choices
    assert events[-1] == responses.DONE
    for choice, s in zip(whole["choices"], sorted(streamed, key=lambda c: c.index)):
        assert choice["finish_reason"] == s.finish_reason == "tool_calls", choice
        assert choice["message"]["content"] is None and not s.message.content
        calls = choice["message"]["tool_calls"]
        for call in calls:
            assert call["function"]["name"] == "add" and len(call["id"]) == 9
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                BOUNDED_ADD["function"]["parameters"])
        assert [(c.function.name, c.function.arguments) for c in s.message.tool_calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_native_auto_text_stays_content(v3_engine):
    """tool_choice auto on v3 (random weights answer text, no [TOOL_CALLS]): plain content,
    streamed as unary, no tool_calls."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": [BOUNDED_ADD],
            "seed": 4, "max_tokens": 12}
    status, whole = _http(v3_engine, body)
    [choice] = whole["choices"]
    assert status == 200 and "tool_calls" not in choice["message"], choice
    status, events = _http(v3_engine, body | {"stream": True})
    [s] = _reassembled(events[:-1]).choices
    assert s.message.content == choice["message"]["content"] and not s.message.tool_calls
    assert s.finish_reason == choice["finish_reason"] == "length"


BAD_PARAMETERS = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "strin"}}}}}     # llguidance: no such type


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "f"}}])
def test_a_forced_tool_whose_schema_does_not_compile_is_named(v3_engine, tool_choice):
    """The 400 names the tool's parameters and llguidance's reason, not `tool_choice` and the
    call-list grammar; a call forced to another tool does not compile the broken one."""
    body = {"messages": [{"role": "user", "content": "Add 2 and 3."}],
            "tools": [BOUNDED_ADD, BAD_PARAMETERS], "tool_choice": tool_choice, "max_tokens": 4}
    status, error = _http(v3_engine, body)
    assert status == 400, error
    assert error["error"]["message"] == "tools[1].function.parameters: Invalid type: strin"
    assert error["error"]["param"] == "tools[1].function.parameters"
    other = {"type": "function", "function": {"name": "add"}}
    assert _http(v3_engine, body | {"tool_choice": other})[0] == 200
