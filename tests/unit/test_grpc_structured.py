"""Issue 22 over gRPC without Ray: the `constraint` oneof and the tool fields of a GenerateRequest
to engine inputs (the same validation functions as the OpenAI HTTP API; each refusal names the
proto field), tool calls in responses (unary whole; streamed pieces that join to the unary
response for any split of the completion), and the servicer in-process: a schema that does not
compile is INVALID_ARGUMENT before the engine is asked. tests/e2e/test_grpc_structured.py has
the same through Serve."""
from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.serving import grpc_messages as gm
from actors.serving import grpc_structured as gs
from actors.serving.engine_client import EngineClient
from actors.serving.validation import tools_inputs
from model.constraint import JSON_OBJECT, Constraint
from model.engine import Completion, StreamChunk
from model.errors import InvalidRequest
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb

CONTEXT, VOCAB = 512, 32000
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CHAT = [pb.ChatMessage(role="user", content="Weather in Paris?")]
BAD_TOOL = json.dumps({"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "strin"}}}}})   # llguidance: no such type
DEEP_HISTORY = CHAT + [
    pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="call_1", name="get_weather",
                                                             arguments="[" * 5000)]),
    pb.ChatMessage(role="tool", tool_call_id="call_1", content="2")]


TOKENIZER = Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def tokenizer():
    return TOKENIZER


def inputs(tokenizer, **fields) -> gm.Inputs:
    return gm.inputs(pb.GenerateRequest(**fields), tokenizer, CONTEXT, VOCAB)


@pytest.mark.parametrize("fields, want", [
    ({"json_schema": '{"type": "string"}'}, Constraint("json", '{"type": "string"}')),
    ({"regex": "[0-9]+"}, Constraint("regex", "[0-9]+")),
    ({"choice": pb.ChoiceConstraint(values=["yes", "no"])}, Constraint("choice", '["yes", "no"]')),
    ({"grammar": 'start: "a"+'}, Constraint("grammar", 'start: "a"+')),
    ({"json_object": True}, Constraint("json", JSON_OBJECT)),
], ids=["json_schema", "regex", "choice", "grammar", "json_object"])
def test_each_constraint_field_reaches_sampling_params_named_by_its_field(tokenizer, fields, want):
    params = inputs(tokenizer, prompt="hi", **fields).params
    assert params.constraint == want
    assert params.constraint.field == next(iter(fields))


def test_no_constraint_or_json_object_false_is_none(tokenizer):
    assert inputs(tokenizer, prompt="hi").params.constraint is None
    assert inputs(tokenizer, prompt="hi", json_object=False).params.constraint is None


@pytest.mark.parametrize("fields, message", [
    ({"json_schema": ""}, "json_schema: the json constraint must be a non-empty string"),
    ({"json_schema": "{not json"}, "json_schema: the JSON schema is not valid JSON"),
    ({"json_schema": "[1]"}, "json_schema: a JSON schema must be an object"),
    ({"regex": "x" * 70000}, "regex: the regex constraint is 70000 characters; the limit is"),
    ({"choice": pb.ChoiceConstraint()}, "choice: choices must be a non-empty list"),
    ({"choice": pb.ChoiceConstraint(values=["a", ""])}, "choice: choices must be a non-empty"),
    ({"grammar": ""}, "grammar: the grammar constraint must be a non-empty string"),
    ({"json_schema": '{"type":"array","items":' * 2000 + "{}" + "}" * 2000},
     "json_schema: nested more than 128 levels"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_constraint_names_its_field(tokenizer, fields, message):
    with pytest.raises(InvalidRequest) as err:
        inputs(tokenizer, prompt="hi", **fields)
    assert message in str(err.value)


@pytest.mark.parametrize("text, value", [
    ("", None), ("none", "none"), ("auto", "auto"), ("required", "required"),
    ("get_weather", {"type": "function", "function": {"name": "get_weather"}}),
    ('{"type": "function", "function": {"name": "auto"}}',
     {"type": "function", "function": {"name": "auto"}}),
])
def test_tool_choice_text_is_openais_value(text, value):
    assert gs.tool_choice_value(text) == value


def test_chat_messages_with_tool_calls_and_results_are_openais_dicts():
    call = pb.ToolCall(id="abcDEF123", name="get_weather", arguments='{"city": "Paris"}')
    assert [gs.message_dict(m) for m in [
        pb.ChatMessage(role="assistant", tool_calls=[call]),
        pb.ChatMessage(role="tool", content='{"temp": 21}', tool_call_id="abcDEF123"),
        pb.ChatMessage(role="user", content="thanks")]] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcDEF123", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "abcDEF123"},
        {"role": "user", "content": "thanks"}]


def test_a_forced_call_is_prompted_and_constrained_as_over_http(tokenizer):
    """The gRPC request's tools go through validation.tools_inputs with the OpenAI values the
    HTTP API would send: the same prompt ids and grammar."""
    got = inputs(tokenizer, messages=CHAT, tools=[json.dumps(WEATHER)],
                 tool_choice="get_weather", parallel_tool_calls=False)
    want = tools_inputs(tokenizer, CONTEXT, [{"role": "user", "content": "Weather in Paris?"}],
                        [WEATHER], {"type": "function", "function": {"name": "get_weather"}},
                        False)
    assert got.prompt_ids == want.prompt_ids and got.params.constraint == want.constraint
    assert got.params.constraint.field == "tool_choice" and got.tools is not None


def test_without_tool_fields_a_chat_is_prompted_as_before(tokenizer):
    got = inputs(tokenizer, messages=CHAT)
    assert got.tools is None
    assert got.prompt_ids == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"}])


@pytest.mark.parametrize("fields, message", [
    ({"messages": CHAT, "tools": ["{not json"]}, "tools[0]: not JSON text"),
    ({"messages": CHAT, "tools": [json.dumps(WEATHER)]}, "tool_choice: 'auto' needs a "
                                                         "vocabulary with tool tokens"),
    ({"messages": CHAT, "tools": [json.dumps(WEATHER), '{"type": "function"}']}, "tools[1]"),
    ({"messages": CHAT, "tools": [json.dumps(WEATHER)], "tool_choice": "get_time"},
     "tool_choice"),
    ({"messages": CHAT, "tools": [json.dumps(WEATHER)], "tool_choice": "{oops"},
     "tool_choice: not JSON text"),
    ({"prompt": "hi", "tools": [json.dumps(WEATHER)]}, "tools: tools go with messages (a chat), "
                                                       "not with prompt"),
    ({"prompt_token_ids": [1, 2], "tool_choice": "required"}, "tool_choice: tools go with "
                                                              "messages"),
    ({"messages": CHAT, "tools": [json.dumps(WEATHER)], "tool_choice": "required",
      "json_schema": '{"type": "object"}'}, "json_schema and tool_choice"),
    ({"prompt": "hi", "messages": CHAT, "tools": [json.dumps(WEATHER)]},
     "set exactly one of prompt, messages and prompt_token_ids"),
    ({"messages": CHAT, "tools": ["[" * 5000 + "]" * 5000], "tool_choice": "required"},
     "tools[0]: nested more than 128 levels"),
    ({"messages": CHAT, "tools": [json.dumps(WEATHER)],
      "tool_choice": "{" + '"a":{' * 3000 + "}" * 3001}, "tool_choice: nested more than 128"),
    ({"messages": DEEP_HISTORY, "tools": [json.dumps(WEATHER)], "tool_choice": "required"},
     "messages[1].tool_calls[0].function.arguments: nested more than 128 levels"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_tool_fields_name_the_field(tokenizer, fields, message):
    with pytest.raises(InvalidRequest) as err:
        inputs(tokenizer, **fields)
    assert message in str(err.value)


# what a forced call on the v1 vocabulary generates: the JSON list of calls (model/tools.py)
CALLS_TEXT = ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
              '{"name": "get_weather", "arguments": {"city": "Lyon"}}]')


def forced(tokenizer) -> gm.Inputs:
    return inputs(tokenizer, messages=CHAT, tools=[json.dumps(WEATHER)], tool_choice="required")


def streamed(responses: gm.Responses, ids: list[int],
             cuts: list[int]) -> list[pb.GenerateResponse]:
    """The stream messages of one choice whose tokens arrive cut at token positions `cuts`,
    each chunk's text the text its tokens add, finished "stop" on the last."""
    bounds = [0, *sorted(set(cuts)), len(ids)]
    texts = [TOKENIZER.decode(ids[:b]) for b in bounds]
    return [responses.stream(StreamChunk("r", texts[i + 1][len(texts[i]):], ids[a:b], [],
                                         "stop" if b == len(ids) else None), None)
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


CALL_IDS = TOKENIZER.encode(CALLS_TEXT, bos=False) + [TOKENIZER.eos_id]


def joined_calls(messages: list[pb.GenerateResponse]) -> list[tuple[str, str, str]]:
    calls: dict[int, list[str]] = {}
    for m in messages:
        for c in m.tool_calls:
            got = calls.setdefault(c.index, ["", "", ""])
            assert not (c.id and got[0]), "a call's id is sent once"
            got[0], got[1], got[2] = got[0] + c.id, got[1] + c.name, got[2] + c.arguments
    return [tuple(calls[i]) for i in sorted(calls)]


def test_unary_tool_calls_are_whole_and_finish_tool_calls(tokenizer):
    given_, ids = forced(tokenizer), CALL_IDS
    assert tokenizer.decode(ids) == CALLS_TEXT
    out = gm.Responses(given_.prompt_ids, False, tokenizer.token_bytes, given_.tools).unary(
        [Completion("r", given_.prompt_ids, ids, CALLS_TEXT, "stop", [])])
    assert (out.text, out.finish_reason) == ("", "tool_calls")
    assert [(c.index, c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_weather", {"city": "Lyon"})]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in out.tool_calls)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=8))
def test_streamed_tool_calls_join_to_the_unary_ones_for_any_split(cuts):
    given_, ids = forced(TOKENIZER), CALL_IDS
    cuts = [c for c in cuts if c < len(ids)]
    unary = gm.Responses(given_.prompt_ids, False, TOKENIZER.token_bytes, given_.tools).unary(
        [Completion("r", given_.prompt_ids, ids, CALLS_TEXT, "stop", [])])
    got = streamed(gm.Responses(given_.prompt_ids, False, TOKENIZER.token_bytes, given_.tools),
                   ids, cuts)
    assert "".join(m.text for m in got) == unary.text
    assert [(n, json.loads(a)) for _, n, a in joined_calls(got)] == [
        (c.name, json.loads(c.arguments)) for c in unary.tool_calls]
    assert [a for _, _, a in joined_calls(got)] == [c.arguments for c in unary.tool_calls]
    assert [m.finish_reason for m in got][-1] == "tool_calls"
    assert not any(m.finish_reason for m in got[:-1])


@pytest.mark.parametrize("cut, calls", [
    (30, []),                                                       # in the first call's head
    (51, [("get_weather", '{"city": "Par')]),                       # in its arguments
    (70, [("get_weather", '{"city": "Paris"}')]),                   # in the second's head
], ids=["head", "arguments", "second head"])
def test_a_call_cut_by_max_tokens_finishes_length(tokenizer, cut, calls):
    """Cut by max_tokens, a forced reply is its begun calls (the last with the arguments so far),
    a head cut short dropped, never content (docs/api.md, "Tool calling")."""
    given_ = forced(tokenizer)
    ids = tokenizer.encode(CALLS_TEXT[:cut], bos=False)
    out = gm.Responses(given_.prompt_ids, False, tokenizer.token_bytes, given_.tools).unary(
        [Completion("r", given_.prompt_ids, ids, CALLS_TEXT[:cut], "length", [])])
    assert out.finish_reason == "length"
    assert out.text == "" and [(c.name, c.arguments) for c in out.tool_calls] == calls


@pytest.mark.parametrize("cut, reason", [(51, "stop"), (len(CALLS_TEXT), "tool_calls")])
def test_a_call_list_cut_by_a_stop_string_finishes_stop_on_both_protocols(tokenizer, cut,
                                                                          reason):
    """A stop string that cuts a forced list leaves "stop" (the arguments may not parse), not
    "tool_calls", which says the list is whole; unary and streamed, gRPC and HTTP alike."""
    from actors.serving.openai_tool_calls import ChoiceCalls
    given_ = forced(tokenizer)
    text, ids = CALLS_TEXT[:cut], tokenizer.encode(CALLS_TEXT[:cut], bos=False)
    done = Completion("r", given_.prompt_ids, ids, text, "stop", [])
    assert gm.Responses(given_.prompt_ids, False, tokenizer.token_bytes,
                        given_.tools).unary([done]).finish_reason == reason
    assert streamed(gm.Responses(given_.prompt_ids, False, tokenizer.token_bytes, given_.tools),
                    ids, [len(ids) // 2])[-1].finish_reason == reason
    assert ChoiceCalls(given_.tools.parser()).message(done)[1] == reason
    chunk = StreamChunk("r", text, ids, [0.0] * len(ids), "stop")
    assert ChoiceCalls(given_.tools.parser()).delta(chunk)[1] == reason


def test_tool_choice_none_answers_plain_text(tokenizer):
    given_ = inputs(tokenizer, messages=CHAT, tools=[json.dumps(WEATHER)], tool_choice="none")
    assert given_.params.constraint is None
    out = gm.Responses(given_.prompt_ids, False, tokenizer.token_bytes, given_.tools).unary(
        [Completion("r", given_.prompt_ids, [5], CALLS_TEXT, "stop", [])])
    assert (out.text, list(out.tool_calls), out.finish_reason) == (CALLS_TEXT, [], "stop")


class _Engine:
    """The EngineClient surface the servicer reads, with EngineClient's own `check`."""

    check = EngineClient.check

    def __init__(self, tokenizer):
        self.tokenizer, self.asked = tokenizer, []

    async def info(self):
        from actors.info import EngineInfo
        return EngineInfo(context_length=CONTEXT, vocab_size=VOCAB, num_layers=2, num_experts=8,
                          experts_per_token=2, frontend_node_id="head", experts={},
                          free_blocks=1, total_blocks=1, retries=0)

    def stream(self, ids, params):
        self.asked.append((ids, params))
        raise AssertionError("a refused request never reaches the engine")


class _Context:
    def invocation_metadata(self):
        return ()

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


@pytest.mark.parametrize("fields, message", [
    ({"json_schema": '{"type": "strin"}'}, "json_schema: "),
    ({"regex": "(unclosed"}, "regex: "),
    ({"grammar": "start: undefined_rule"}, "grammar: "),
    ({"messages": CHAT, "tools": [json.dumps(WEATHER), BAD_TOOL], "tool_choice": "required"},
     "tools[1].function.parameters: "),
], ids=["json_schema", "regex", "grammar", "tool parameters"])
def test_a_constraint_that_does_not_compile_is_invalid_argument_before_any_message(
        tokenizer, fields, message):
    """A forced call's grammar that does not compile names the tool whose parameters schema
    does not, with llguidance's reason, never the call-list grammar (`tool_choice`, %json)."""
    from actors.serving.grpc_servicer import GeneratorServicer
    s = GeneratorServicer()
    s.engine, s.api_key_digest = _Engine(tokenizer), None
    req = pb.GenerateRequest(**({} if "messages" in fields else {"prompt": "hi"}), **fields)

    async def stream(context):
        return [m async for m in s.GenerateStream(req, context)]
    for call in (lambda context: [asyncio.run(s.Generate(req, context))],
                 lambda context: asyncio.run(stream(context))):
        context = _Context()
        assert call(context) == [pb.GenerateResponse()] and context.code.name == "INVALID_ARGUMENT"
        assert context.details.startswith(message) and not s.engine.asked
        assert "%json" not in context.details and "Invalid type: strin" in (
            context.details if "tools" in fields else "Invalid type: strin")


def test_native_v3_tool_calls_and_history_over_grpc():
    """The v3 vocabulary (tiny-v3's): a chat with an earlier call and its result is prompted as
    mistral-common encodes it (model/tools.py's oracle), and a reply of [TOOL_CALLS] then the
    call list is read into calls, unary and streamed alike."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from model.spm import mistral_common_model
    v3 = Tokenizer.from_model_file(mistral_common_model(32768))
    history = [CHAT[0], pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(
                   id="abcDEF123", name="get_weather", arguments='{"city": "Paris"}')]),
               pb.ChatMessage(role="tool", content="21 C", tool_call_id="abcDEF123"),
               pb.ChatMessage(role="user", content="And in Lyon?")]
    got = gm.inputs(pb.GenerateRequest(messages=history, tools=[json.dumps(WEATHER)]), v3,
                    CONTEXT, 32768)
    f = WEATHER["function"]
    want = MistralTokenizer.v3().encode_chat_completion(ChatCompletionRequest(
        tools=[Tool(function=Function(name=f["name"], description=f["description"],
                                      parameters=f["parameters"]))],
        messages=[UserMessage(content="Weather in Paris?"),
                  AssistantMessage(tool_calls=[ToolCall(id="abcDEF123", function=FunctionCall(
                      name="get_weather", arguments='{"city": "Paris"}'))]),
                  ToolMessage(content="21 C", tool_call_id="abcDEF123"),
                  UserMessage(content="And in Lyon?")])).tokens
    assert got.prompt_ids == want and got.params.constraint is None       # "auto": no grammar
    ids = [v3.control_id("[TOOL_CALLS]"), *v3.encode(CALLS_TEXT, bos=False), v3.eos_id]
    text = v3.decode(ids)
    unary = gm.Responses(got.prompt_ids, False, v3.token_bytes, got.tools).unary(
        [Completion("r", got.prompt_ids, ids, text, "stop", [])])
    assert (unary.text, unary.finish_reason) == ("", "tool_calls")
    assert [json.loads(c.arguments)["city"] for c in unary.tool_calls] == ["Paris", "Lyon"]
    responses = gm.Responses(got.prompt_ids, False, v3.token_bytes, got.tools)
    stream = [responses.stream(StreamChunk("r", v3.decode(ids[:i + 1])[len(v3.decode(ids[:i])):],
                                           [t], [], "stop" if i == len(ids) - 1 else None), None)
              for i, t in enumerate(ids)]
    assert "".join(m.text for m in stream) == ""
    assert [(n, a) for _, n, a in joined_calls(stream)] == [
        (c.name, c.arguments) for c in unary.tool_calls]
