"""model/tools.py, model/tool_parser.py and model/chat_tools.py against their oracles: v3 prompts
with tools equal mistral-common's `encode_chat_completion` (property-based), the call-list
grammars compile with llguidance over our tokenizer.json and accept what the parser reads, and
any split of a call list into streamed pieces reassembles to the same calls."""
from __future__ import annotations

import json
import string

import llguidance
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall
from mistral_common.protocol.instruct.tool_calls import Tool as MistralTool
from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from model.chat import ChatTemplateError
from model.chat_tools import TOOL_RESULTS_PREFIX, mistral_call_id
from model.errors import MAX_JSON_DEPTH, InvalidRequest, JsonTooDeep, check_json_depth, parse_json
from model.spm import mistral_common_model
from model.tokenizer import Tokenizer
from model.tools import (
    Tool,
    ToolCallDelta,
    ToolCalling,
    ToolChoice,
    tool_choice_of,
    tools_of,
)

PROPERTY = settings(max_examples=150, deadline=None, database=None)
WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "days": {"type": "integer", "minimum": 1}},
           "required": ["city"]}
REFS = {"type": "object", "properties": {"when": {"$ref": "#/$defs/Date"}},
        "required": ["when"], "$defs": {"Date": {"type": "string", "pattern": "^[0-9]{4}$"}}}
TOOLS = (Tool("get_weather", "The weather of a city", WEATHER), Tool("book", "", REFS),
         Tool("ping"))


@pytest.fixture(scope="module")
def v3():
    return Tokenizer.from_model_file(mistral_common_model(32768))


@pytest.fixture(scope="module")
def v1():
    return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def mistral_v3():
    return MistralTokenizer.v3()


# ---- tools and tool_choice fields -------------------------------------------------------------

def _fn(**function) -> dict:
    return {"type": "function", "function": function}


def test_tools_of_reads_openai_tools():
    tools = tools_of([_fn(name="get_weather", description="d", parameters=WEATHER, strict=True),
                      _fn(name="ping")])
    assert tools == (Tool("get_weather", "d", WEATHER), Tool("ping", "", {}))
    assert tools_of(None) == ()


@pytest.mark.parametrize("value, field", [
    ("x", "tools: expected a list"),
    ([{"type": "web_search"}], "tools[0].type: only 'function'"),
    ([{"type": "function"}], "tools[0].function: expected an object"),
    ([_fn(name="ok"), _fn(name="a b")], "tools[1].function.name: 'a b' is not a function name"),
    ([_fn(name="x" * 65)], "tools[0].function.name"),
    ([_fn(name="f"), _fn(name="f")], "tools[1].function.name: 'f' is already"),
    ([_fn(name="f", description=3)], "tools[0].function.description: expected str"),
    ([_fn(name="f", parameters=[])], "tools[0].function.parameters: expected a JSON Schema"),
    ([_fn(name="f", parameters={"type": "string"})], "tools[0].function.parameters.type"),
    ([_fn(name="f", strict="yes")], "tools[0].function.strict: expected a boolean"),
    ([_fn(name="f")] * 129, "tools: 129 tools; the limit is 128"),
])
def test_tools_of_names_the_field(value, field):
    with pytest.raises(InvalidRequest) as info:
        tools_of(value)
    assert str(info.value).startswith(field)


def test_tool_choice_of():
    assert tool_choice_of(None, TOOLS) == ToolChoice("auto")
    assert tool_choice_of(None, ()) == ToolChoice("none")
    assert tool_choice_of("required", TOOLS) == ToolChoice("required")
    named = {"type": "function", "function": {"name": "book"}}
    assert tool_choice_of(named, TOOLS) == ToolChoice("function", "book")


@pytest.mark.parametrize("value, tools, field", [
    ("always", TOOLS, "tool_choice: expected 'none', 'auto', 'required'"),
    ({"type": "function", "function": {"name": "nope"}}, TOOLS,
     "tool_choice.function.name: 'nope' is not one of"),
    ({"type": "function"}, TOOLS, "tool_choice: expected"),
    ({"type": "function", "function": {"name": 3}}, TOOLS, "tool_choice.function.name: expected"),
    ("required", (), "tool_choice: 'required' needs tools"),
    ("auto", (), "tool_choice: 'auto' needs tools"),
])
def test_tool_choice_of_names_the_field(value, tools, field):
    with pytest.raises(InvalidRequest) as info:
        tool_choice_of(value, tools)
    assert str(info.value).startswith(field)


# ---- v3 prompts against mistral-common --------------------------------------------------------

def _reference(mistral, messages: list[dict], tools) -> list[int]:
    out = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            out.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            out.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            out.append(ToolMessage(content=m["content"],
                                   tool_call_id=mistral_call_id(m["tool_call_id"])))
        elif m.get("tool_calls"):
            out.append(AssistantMessage(content=m.get("content"), tool_calls=[
                MistralToolCall(id=mistral_call_id(c["id"]), function=FunctionCall(
                    name=c["function"]["name"], arguments=c["function"]["arguments"]))
                for c in m["tool_calls"]]))
        else:
            out.append(AssistantMessage(content=m["content"]))
    request = ChatCompletionRequest(messages=out, tools=[
        MistralTool(function=Function(name=t.name, description=t.description,
                                      parameters=t.parameters)) for t in tools] or None)
    return mistral.encode_chat_completion(request).tokens


TEXT = st.one_of(st.sampled_from(["", " ", "Hi", "[INST]", "[TOOL_CALLS]", "\n\n", "a  b "]),
                 st.text(max_size=12))
JSON_TEXT = st.one_of(TEXT, st.sampled_from(['{"city": "Paris"}', '{}', '[1, 2]', '3', 'null',
                                             '{"a":{"b":[true,1.5]}}', '"quoted"', "NaN"]))
CALL_IDS = st.one_of(st.text(string.ascii_letters + string.digits, min_size=9, max_size=9),
                     st.text(min_size=1, max_size=12).map(lambda s: "call_" + s))


@st.composite
def tool_round(draw) -> list[dict]:
    """An assistant's 1-3 tool calls, their results (any order), maybe the assistant's answer."""
    n = draw(st.integers(1, 3))
    ids = draw(st.lists(CALL_IDS, min_size=n, max_size=n, unique_by=mistral_call_id))
    calls = [{"id": i, "type": "function", "function": {
        "name": draw(st.sampled_from([t.name for t in TOOLS])), "arguments": draw(JSON_TEXT)}}
        for i in ids]
    content = draw(st.sampled_from([None, ""]))
    results = [{"role": "tool", "content": draw(JSON_TEXT), "tool_call_id": i}
               for i in draw(st.permutations(ids))]
    answer = [{"role": "assistant", "content": draw(TEXT.filter(bool))}] * draw(st.booleans())
    return [{"role": "assistant", "content": content, "tool_calls": calls}, *results, *answer]


@st.composite
def tool_conversations(draw) -> list[dict]:
    """System?, then rounds of user + (assistant text | tool round), ending with a user
    message or with tool results."""
    messages = [{"role": "system", "content": draw(TEXT)}] * draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        if draw(st.booleans()):
            messages += draw(tool_round())
        else:
            messages.append({"role": "assistant", "content": draw(TEXT.filter(bool))})
    if messages[-1]["role"] == "assistant" or draw(st.booleans()):
        messages.append({"role": "user", "content": draw(TEXT)})
    return messages


@PROPERTY
@given(messages=tool_conversations(), tools=st.lists(st.sampled_from(TOOLS), unique=True,
                                                      max_size=3))
def test_v3_prompt_with_tools_matches_mistral_common(v3, mistral_v3, messages, tools):
    event("ends with a tool result" if messages[-1]["role"] == "tool" else "ends with user")
    expected = _reference(mistral_v3, messages, tools)
    choice = ToolChoice("auto" if tools else "none")
    assert ToolCalling(v3).prompt_ids(messages, tuple(tools), choice) == expected


def test_v3_ends_with_tool_results_and_maps_openai_ids(v3, mistral_v3):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_abc123", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "abcdefghi", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "abcdefghi"},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_abc123"}]
    ids = ToolCalling(v3).prompt_ids(messages, TOOLS, ToolChoice("auto"))
    assert ids == _reference(mistral_v3, messages, TOOLS)
    mapped = mistral_call_id("call_abc123")
    assert len(mapped) == 9 and mapped.isalnum() and mapped == mistral_call_id("call_abc123")
    assert mistral_call_id("abcdefghi") == "abcdefghi"
    assert ids.count(v3.control_id("[TOOL_RESULTS]")) == 2
    assert ids.count(v3.control_id("[AVAILABLE_TOOLS]")) == 1


def test_v3_tool_choice_none_leaves_the_tools_out(v3, mistral_v3):
    messages = [{"role": "user", "content": "Hi"}]
    ids = ToolCalling(v3).prompt_ids(messages, TOOLS, ToolChoice("none"))
    assert ids == _reference(mistral_v3, messages, ()) == v3.apply_chat_template(messages)


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r", "tool_call_id": "a"}],
     "messages[1].role: expected 'assistant', got 'tool'"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f",
                                                                   "arguments": "{}"}}]},
      {"role": "user", "content": "q"}], "messages[2].role: expected 'tool', got 'user'"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f",
                                                                   "arguments": "{}"}}]},
      {"role": "tool", "content": "r", "tool_call_id": "b"}],
     "messages[2].tool_call_id: 'b' answers no pending call of messages[1].tool_calls"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "x", "tool_calls": [
          {"id": "a", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages[1].content: an assistant message with tool_calls must have no content"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f g",
                                                                   "arguments": "{}"}}]}],
     "messages[1].tool_calls[0].function.name"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f",
                                                                   "arguments": {}}}]}],
     "messages[1].tool_calls[0].function.arguments: expected str"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f",
                                                                   "arguments": "{}"}}] * 2}],
     "messages[1].tool_calls[1].id: 'a' is already"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f",
                                                                   "arguments": "{}"}},
                                           {"id": "b", "function": {"name": "f",
                                                                    "arguments": "{}"}}]},
      {"role": "tool", "content": "r", "tool_call_id": "a"}],
     "messages[2].role: the tool calls 'b' of messages[1] have no 'tool' result"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f",
                                                                   "arguments": "{}"}}]},
      {"role": "tool", "content": "r"}], "messages[2].tool_call_id: expected str"),
])
def test_tool_message_errors_name_the_field(v3, v1, messages, field):
    for tok in (v3, v1):
        with pytest.raises(ChatTemplateError) as info:
            tok.apply_chat_template(messages)
        assert str(info.value).startswith(field), str(info.value)


# ---- client JSON nested too deep: a refusal naming the field, never a RecursionError ---------

def _nested(depth: int, kind: str):
    """A JSON value `depth` levels deep: lists or {"a": ...} objects around a 1."""
    value = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


@given(depth=st.integers(0, 2 * MAX_JSON_DEPTH), kind=st.sampled_from(["list", "dict"]))
@settings(max_examples=60, deadline=None, database=None)
def test_client_json_deeper_than_the_limit_is_refused_naming_the_field(depth, kind):
    value = _nested(depth, kind)
    text = json.dumps(value)
    if depth <= MAX_JSON_DEPTH:
        assert parse_json(text, "f") == value
        check_json_depth(value, "f")
        return
    for check in (lambda: parse_json(text, "f"), lambda: check_json_depth(value, "f")):
        with pytest.raises(JsonTooDeep, match=f"^f: nested more than {MAX_JSON_DEPTH} levels"):
            check()


@pytest.mark.parametrize("text", ["[" * 5000, "[" * 5000 + "]" * 5000,
                                  '{"a":' * 3000 + "1" + "}" * 3000])
def test_json_past_pythons_recursion_limit_is_too_deep_not_a_recursion_error(text):
    with pytest.raises(JsonTooDeep, match="^tools\\[0\\]: nested more than"):
        parse_json(text, "tools[0]")


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("where, field", [
    ("arguments", "messages[1].tool_calls[0].function.arguments: nested more than"),
    ("content", "messages[2].content: nested more than"),
])
def test_deep_tool_arguments_or_results_are_refused_naming_the_field(v3, v1, where, field):
    call = {"id": "abcDEF123", "function": {"name": "get_weather",
                                            "arguments": DEEP if where == "arguments" else "{}"}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "abcDEF123",
                 "content": DEEP if where == "content" else "3"}]
    for tok in (v3, v1):
        with pytest.raises(ChatTemplateError) as info:
            ToolCalling(tok).prompt_ids(messages, TOOLS, ToolChoice("required"))
        assert str(info.value).startswith(field), str(info.value)


def test_deep_tool_parameters_are_refused_naming_them():
    deep = {"type": "object", "properties": {"x": _nested(MAX_JSON_DEPTH, "dict")}}
    with pytest.raises(JsonTooDeep, match="^tools\\[0\\].function.parameters: nested more"):
        tools_of([_fn(name="f", parameters=deep)])
    with pytest.raises(JsonTooDeep, match="^tools\\[0\\]: nested more"):
        tools_of([{**_fn(name="f"), "x": _nested(900, "list")}])


def test_an_auto_reply_with_arguments_too_deep_for_json_stays_content(v3):
    """The model's own text is parsed with the same helper: past json's recursion, content."""
    calling = ToolCalling(v3)
    parser = calling.parser(TOOLS, ToolChoice("auto"))
    text = ' [{"name": "ping", "arguments": {"a": ' + "[" * 3000 + "]" * 3000 + "}}]"
    out = _run(parser, calling.tool_calls_id, [text])
    assert parser.finish() == (text, []) and "".join(out) == text


# ---- v1: forced calls described in text, auto refused -----------------------------------------

def test_v1_refuses_auto_naming_tool_choice(v1):
    with pytest.raises(InvalidRequest, match="^tool_choice: 'auto' needs a vocabulary"):
        ToolCalling(v1).prompt_ids([{"role": "user", "content": "Hi"}], TOOLS, ToolChoice("auto"))


def test_v1_forced_prompt_is_the_documented_text(v1):
    messages = [{"role": "user", "content": "Weather?"}]
    ids = ToolCalling(v1).prompt_ids(messages, TOOLS[:1], ToolChoice("function", "get_weather"))
    listed = json.dumps([TOOLS[0].openai()])
    text = ("You can call these tools (the parameters are a JSON Schema of each function's "
            f"arguments):\n{listed}\nCall the function \"get_weather\". Answer with a JSON list "
            "of the calls to make, each {\"name\": <function name>, \"arguments\": <arguments "
            "object>}.\n\nWeather?")
    assert ids == v1.apply_chat_template([{"role": "user", "content": text}])
    assert ToolCalling(v1).prompt_ids(messages, TOOLS, ToolChoice("none")) == \
        v1.apply_chat_template(messages)


def test_v1_tool_history_is_text(v1):
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
                {"role": "user", "content": "Thanks"}]
    plain = [{"role": "user", "content": "Weather?"},
             {"role": "assistant",
              "content": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'},
             {"role": "user", "content": TOOL_RESULTS_PREFIX
              + '[{"name": "get_weather", "content": {"temp": 21}}]\n\nThanks'}]
    assert v1.apply_chat_template(messages) == v1.apply_chat_template(plain)


# ---- grammars ---------------------------------------------------------------------------------

def _matcher(tok: Tokenizer, lark: str) -> llguidance.LLMatcher:
    lltok = llguidance.LLTokenizer(tok.backend_json, n_vocab=tok.vocab_size,
                                   eos_token=tok.eos_id)
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    assert llguidance.LLMatcher.validate_grammar(grammar, lltok) == ""
    return llguidance.LLMatcher(lltok, grammar)


CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, ' \
        '{"name": "book", "arguments": {"when": "2026"}}]'


@pytest.mark.parametrize("native", [True, False])
def test_call_list_grammar_accepts_a_call_list_and_rejects_others(v3, v1, native):
    tok = v3 if native else v1
    calling = ToolCalling(tok)
    constraint = calling.constraint(TOOLS, ToolChoice("required"), parallel=True)
    assert (constraint.kind, constraint.field) == ("grammar", "tool_choice")
    marker = [calling.tool_calls_id] if native else []
    good = _matcher(tok, constraint.spec)
    assert good.consume_tokens(marker + tok.encode(CALLS, bos=False)) and good.is_accepting()
    single = calling.constraint(TOOLS, ToolChoice("required"), parallel=False)
    one = _matcher(tok, single.spec)
    assert not one.consume_tokens(marker + tok.encode(CALLS, bos=False))
    named = calling.constraint(TOOLS, ToolChoice("function", "book"), parallel=True)
    assert not _matcher(tok, named.spec).consume_tokens(marker + tok.encode(CALLS, bos=False))
    bad_ref = CALLS.replace('"2026"', '"20x6"')
    assert not _matcher(tok, constraint.spec).consume_tokens(marker + tok.encode(bad_ref,
                                                                                 bos=False))
    assert calling.constraint(TOOLS, ToolChoice("auto"), True) is None
    assert calling.constraint(TOOLS, ToolChoice("none"), True) is None


# ---- the parser -------------------------------------------------------------------------------

ARGS = st.dictionaries(st.text(max_size=5), st.one_of(
    st.integers(), st.text(max_size=6), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                         max_size=2)), max_size=3)
CALL_LISTS = st.lists(st.tuples(st.sampled_from([t.name for t in TOOLS]), ARGS), min_size=1,
                      max_size=3)


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def _run(parser, marker: int | None, pieces: list[str]) -> list:
    out = parser.push([marker], "") if marker is not None else []
    for piece in pieces:
        out += parser.push([1000], piece)
    return out + parser.flush()


@PROPERTY
@given(calls=CALL_LISTS, cuts=st.lists(st.integers(0, 400), max_size=12),
       native=st.booleans(), forced=st.booleans())
def test_any_split_of_a_call_list_reassembles_to_its_calls(v3, v1, calls, cuts, native, forced):
    if not native and not forced:
        forced = True                                     # v1 refuses auto
    calling = ToolCalling(v3 if native else v1)
    choice = ToolChoice("required" if forced else "auto")
    text = " " + json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)
    parser = calling.parser(TOOLS, choice)
    out = _run(parser, calling.tool_calls_id, _split(text, cuts))
    content, parsed = parser.finish()
    assert content == "" and [c.name for c in parsed] == [n for n, _ in calls]
    assert [json.loads(c.arguments) for c in parsed] == [a for _, a in calls]
    for k, call in enumerate(parsed):
        deltas = [d for d in out if isinstance(d, ToolCallDelta) and d.index == k]
        assert (deltas[0].id, deltas[0].name, deltas[0].arguments) == (call.id, call.name, "")
        assert all(d.id is None and d.name is None for d in deltas[1:])
        assert "".join(d.arguments for d in deltas) == call.arguments
        assert len(call.id) == 9 and call.id.isalnum()
    unary = calling.parser(TOOLS, choice)
    _run(unary, calling.tool_calls_id, [text])
    assert [(c.name, c.arguments) for c in unary.finish()[1]] == \
        [(c.name, c.arguments) for c in parsed]


@PROPERTY
@given(calls=CALL_LISTS, cut=st.integers(0, 400), cuts=st.lists(st.integers(0, 400), max_size=6),
       native=st.booleans())
def test_a_forced_call_list_cut_anywhere_is_its_begun_calls(v3, v1, calls, cut, cuts, native):
    """max_tokens cuts a forced list anywhere (finish_reason "length"): the reply is only
    calls, never content; each call whose head `{"name": "f", "arguments": ` came whole is a
    call with the arguments generated so far ("" or JSON that may not parse); a head cut short
    is dropped. Streamed deltas join to the same calls (docs/api.md, "Tool calling")."""
    text, spans = " [", []
    for k, (name, args) in enumerate(calls):
        text += (", " if k else "") + f'{{"name": "{name}", "arguments": '
        arguments = json.dumps(args, ensure_ascii=False)
        spans.append((name, len(text), len(text) + len(arguments)))
        text += arguments + "}"
    text += "]"
    assert text == " " + json.dumps([{"name": n, "arguments": a} for n, a in calls],
                                    ensure_ascii=False)
    calling = ToolCalling(v3 if native else v1)
    parser = calling.parser(TOOLS, ToolChoice("required"))
    out = _run(parser, calling.tool_calls_id, _split(text[:cut], cuts))
    content, parsed = parser.finish()
    want = [(name, text[start:min(end, cut)]) for name, start, end in spans if start <= cut]
    assert content == "" and not [p for p in out if isinstance(p, str)]
    assert [(c.name, c.arguments) for c in parsed] == want
    for k, call in enumerate(parsed):
        assert "".join(d.arguments for d in out if d.index == k) == call.arguments


@pytest.mark.parametrize("pieces, content, names", [
    (["Hello", " world"], "Hello world", []),                          # no marker: text
    ([' [{"name": "nope", "arguments": {}}]'], ' [{"name": "nope", "arguments": {}}]', []),
    ([' [{"name": "ping", "arguments": {}}, ', "garbage"], "garbage", ["ping"]),
    ([' [{"name": "ping", "arguments": {"a": 01}}]'], ' [{"name": "ping", "arguments": '
     '{"a": 01}}]', []),
    ([" [{\"name\": \"pi"], " [{\"name\": \"pi", []),                    # cut short
    ([' [{"name": "ping", "arguments": {"a": "}"}}]'], "", ["ping"]),
])
def test_auto_output_that_is_not_a_call_list_stays_content(v3, pieces, content, names):
    calling = ToolCalling(v3)
    parser = calling.parser(TOOLS, ToolChoice("auto"))
    marker = calling.tool_calls_id if pieces[0].startswith(" [") else None
    out = _run(parser, marker, pieces)
    got_content, calls = parser.finish()
    assert got_content == content == "".join(p for p in out if isinstance(p, str))
    assert [c.name for c in calls] == names


def test_text_before_the_marker_makes_the_completion_content(v3):
    calling = ToolCalling(v3)
    parser = calling.parser(TOOLS, ToolChoice("auto"))
    out = parser.push([1000], "Sure") + parser.push([calling.tool_calls_id], "")
    out += parser.push([1000], ' [{"name": "ping", "arguments": {}}]') + parser.flush()
    assert parser.finish() == ('Sure [{"name": "ping", "arguments": {}}]', [])
    assert calling.parser(TOOLS, ToolChoice("none")) is None


@pytest.mark.parametrize("value", ["x" * 10_000, {"type": "function",
                                                   "function": {"name": "f" * 10_000}}])
def test_a_long_tool_choice_is_quoted_short_in_its_refusal(value):
    """A refusal names the field and quotes at most 100 characters of the client's value."""
    tools = tools_of([{"type": "function", "function": {"name": "g"}}])
    with pytest.raises(InvalidRequest, match="^tool_choice") as e:
        tool_choice_of(value, tools)
    assert len(str(e.value)) < 300
