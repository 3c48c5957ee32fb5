"""Structured outputs and tools on the OpenAI HTTP API without a server: `response_format`,
vLLM's `structured_outputs` and `guided_*` to one Constraint (or a 400 naming the field), the
tools' prompt and forcing grammar, and tool calls in OpenAI's whole and streamed shapes
(reassembled by the `openai` SDK's own stream accumulator). tests/e2e/test_openai_structured.py
has the same through Serve with the official client."""
from __future__ import annotations

import json

import pydantic
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from actors.info import EngineInfo
from actors.serving import openai_api as oai
from actors.serving import openai_responses as responses
from actors.serving import validation
from model.constraint import JSON_OBJECT, Constraint
from model.errors import InvalidRequest
from model.tokenizer import Tokenizer

INFO = EngineInfo(context_length=2048, vocab_size=32000, num_layers=2, num_experts=8,
                  experts_per_token=2, frontend_node_id="head", experts={}, free_blocks=1,
                  total_blocks=1, retries=0)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


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
