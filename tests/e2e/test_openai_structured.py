"""Structured outputs and tool calls through Serve's HTTP proxy with the official `openai`
client, on the random-weights tiny model (v1 vocabulary: tools forced by a grammar): a grammar
makes even random weights answer valid JSON, a match of a regex, one of the choices, or tool
calls whose arguments fit the tool's schema. Streamed equals unary (seeded), and every refusal
is a 400 naming its field, before any stream starts."""
from __future__ import annotations

import asyncio
import json
import pathlib
import re

import jsonschema
import pydantic
import pytest

from model.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

MODEL = "tiny"                  # the shared app's (tests/e2e/conftest.py: TINY_MODEL)
SCHEMAS = sorted((pathlib.Path(__file__).parent.parent / "data" / "schemas").glob("*.json"))
MAX_TOKENS = 400                # bounded schemas end well within it (their strings are short)
ASK = [{"role": "user", "content": "Answer in JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}


@pytest.fixture(scope="module")
def base_url(tiny_app, http_port) -> str:
    assert tiny_app.model == MODEL
    return f"http://127.0.0.1:{http_port}/v1"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gather(base_url):
    """gather(make) -> the results of the coroutines `make(async_client)` returns, run
    concurrently on a new event loop with a client of its own."""
    def run(make):
        async def every():
            async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                          timeout=300) as aclient:
                return await asyncio.gather(*make(aclient))
        return asyncio.run(every())
    return run


# jsonschema's format checks, "date-time" by RFC 3339's grammar (section 5.6), which llguidance
# follows: a second of 60 at any minute (a leap second), where jsonschema's own check wants a
# calendar-valid one
FORMATS = jsonschema.FormatChecker()
RFC3339 = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3])"
                     r":[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
FORMATS.checks("date-time")(lambda text: not isinstance(text, str)
                            or RFC3339.fullmatch(text) is not None)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    role: str = pydantic.Field(json_schema_extra={"enum": ["admin", "user"]})


def test_parse_returns_the_pydantic_object(client):
    reply = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person,
                                          seed=1, max_tokens=MAX_TOKENS)
    [choice] = reply.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person), choice.message.content
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


async def _unary_and_streamed(aclient, seed: int, **kwargs) -> tuple[str, str, str]:
    """(unary content, streamed content, streamed finish_reason) of one seeded request."""
    args = dict(model=MODEL, messages=ASK, max_tokens=MAX_TOKENS, seed=seed, **kwargs)
    unary = await aclient.chat.completions.create(**args)
    pieces, finish = [], None
    async for chunk in await aclient.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert unary.choices[0].finish_reason == "stop", unary.choices[0].message.content[-200:]
    return unary.choices[0].message.content, "".join(pieces), finish


def test_json_schema_corpus_unary_and_streamed_validate(gather):
    """Every schema of tests/data/schemas (real-world shapes: nested objects, arrays, enums,
    required fields, bounded numbers, patterns, formats, $refs), strict, sent concurrently:
    each answer validates with `jsonschema`, and streamed equals unary."""
    assert len(SCHEMAS) >= 50

    async def one(aclient, seed: int, path: pathlib.Path):
        schema = json.loads(path.read_text())
        fmt = {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema,
                                                      "strict": True}}
        unary, streamed, finish = await _unary_and_streamed(aclient, seed, response_format=fmt)
        return path.stem, schema, unary, streamed, finish

    bad = {}
    answers = gather(lambda aclient: [one(aclient, seed, p) for seed, p in enumerate(SCHEMAS)])
    for name, schema, unary, streamed, finish in answers:
        try:
            jsonschema.validate(json.loads(unary), schema, format_checker=FORMATS)
        except (ValueError, jsonschema.ValidationError) as e:
            bad[name] = (unary, str(e).splitlines()[0])
        assert (streamed, finish) == (unary, "stop"), name
    assert not bad, bad


def _closing_bias() -> dict[str, int]:
    """logit_bias +10 on the tokens that close a JSON string or object (the tiny model's v1
    vocabulary: '"', '}', '"}' with or without a leading space)."""
    tok = Tokenizer.from_pretrained()
    return {str(i): 10 for i in range(tok.vocab_size)
            if tok.token_bytes(i).strip() in (b'"', b"}", b'"}')}


def test_regex_choice_json_object_and_grammar_match(gather):
    """vLLM's structured_outputs and guided_* kinds, and json_object, on chat."""
    cases = [({"extra_body": {"structured_outputs": {"regex": r"[A-Z][a-z]{2,6} [0-9]{1,3}"}}},
              lambda t: re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{1,3}", t)),
             ({"extra_body": {"guided_choice": ["red", "green", "blue"]}},
              lambda t: t in ("red", "green", "blue")),
             ({"extra_body": {"guided_grammar": 'start: "x" ("y" | "z")'}},
              lambda t: t in ("xy", "xz")),
             # random weights seldom close a free JSON string: a bias toward '"' and '}'
             ({"response_format": {"type": "json_object"}, "logit_bias": _closing_bias()},
              lambda t: isinstance(json.loads(t), dict))]

    answers = gather(lambda aclient: [_unary_and_streamed(aclient, 7, **kw) for kw, _ in cases])
    for (kw, ok), (unary, streamed, finish) in zip(cases, answers):
        assert ok(unary), (kw, unary)
        assert (streamed, finish) == (unary, "stop")


def test_completions_take_a_constraint_too(client):
    reply = client.completions.create(model=MODEL, prompt="Digits:", max_tokens=20, seed=3,
                                      extra_body={"guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", reply.choices[0].text), reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


def _streamed_calls(client, **args) -> dict[int, tuple[list[dict], str | None]]:
    """Per choice: the tool calls of a stream, reassembled as OpenAI's clients do (by index:
    id and name from the first delta, arguments concatenated), and its finish_reason."""
    calls: dict[int, dict[int, dict]] = {}
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            finish[c.index] = c.finish_reason or finish.get(c.index)
            assert not c.delta.content, c.delta.content
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(c.index, {}).setdefault(
                    d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                assert d.id in (None, call["id"])
                call["arguments"] += d.function.arguments or ""
    return {i: ([calls[i][k] for k in sorted(calls.get(i, {}))], finish[i]) for i in finish}


@pytest.mark.parametrize("tool_choice, parallel", [
    ("required", True), ("required", False),
    ({"type": "function", "function": {"name": "add"}}, True)])
def test_forced_tool_calls_validate_and_stream_as_unary(client, tool_choice, parallel):
    """n = 2 seeded choices, each parsed on its own: calls of the tools (of the named one)
    whose arguments validate against its parameters; streamed, each choice's calls equal its
    unary ones."""
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                tools=[WEATHER, ADD], tool_choice=tool_choice, parallel_tool_calls=parallel,
                max_tokens=MAX_TOKENS, seed=11, n=2)
    choices = client.chat.completions.create(**args).choices
    streamed = _streamed_calls(client, **args)
    assert sorted(streamed) == [c.index for c in choices] == [0, 1]
    for choice in choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert re.fullmatch("[A-Za-z0-9]{9}", call.id) and call.type == "function"
            if isinstance(tool_choice, dict):
                assert call.function.name == "add"
            jsonschema.validate(json.loads(call.function.arguments),
                                PARAMETERS[call.function.name])
        got, finish = streamed[choice.index]
        assert finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in got] == [
            (c.function.name, c.function.arguments) for c in calls]
        assert all(re.fullmatch("[A-Za-z0-9]{9}", c["id"]) for c in got)


def test_a_tool_result_conversation_continues(client):
    """The calls of one reply and their results back in `messages` (as an agent loop sends
    them): the next forced call is answered."""
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3."}], tools=[ADD],
        tool_choice="required", parallel_tool_calls=False, max_tokens=MAX_TOKENS, seed=5)
    message = first.choices[0].message
    history = [{"role": "user", "content": "Add 2 and 3."}, message.model_dump(),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "5"},
               {"role": "user", "content": "Now add 5 and 5."}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[ADD],
                                            tool_choice="required", max_tokens=MAX_TOKENS,
                                            seed=6)
    assert second.choices[0].finish_reason == "tool_calls"


def test_docs_structured_outputs_code_runs(base_url, doc_code, monkeypatch, capsys):
    monkeypatch.setenv("MIXTRAL_EP_URL", base_url.removesuffix("/v1"))
    code = doc_code("docs/api.md", "Structured outputs and tools over HTTP")
    exec(compile(code, "docs/api.md (Structured outputs and tools over HTTP)", "exec"), {})
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("body, field, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format", "strin"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "regex"),
    ({"guided_grammar": "start: nothing_here"}, "guided_grammar", "nothing_here"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}},
     "response_format", "response_format and guided_regex: set one"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "nope"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"},
     "guided_regex", "guided_regex and tool_choice: set one"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}],
      "tool_choice": "required"}, "tools[0].function.name", "bad name!"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_refusals_are_400s_naming_the_field(client, body, field, needle, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, stream=stream,
                                       extra_body=body)
    error = e.value.body
    assert error["message"].startswith(field) and needle in error["message"], error
    assert error["param"] == field
