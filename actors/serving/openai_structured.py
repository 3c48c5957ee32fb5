"""The OpenAI HTTP API's structured-output fields: their request models and the one Constraint
(model/constraint.py) they make. Pure; the rest of a request is actors/serving/openai_api.py's.

Accepted, on /v1/chat/completions and /v1/completions alike:
- OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`
  (any JSON object) or `{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}` (the completion is a JSON document valid under `schema`, `strict` or not);
  what `client.chat.completions.parse(response_format=PydanticModel)` sends.
- vLLM's `structured_outputs`: `{"json": schema object or its JSON text, "regex": text,
  "choice": [strings], "grammar": Lark text (llguidance's dialect), "json_object": true}`,
  one key set; and vLLM's older names `guided_json`, `guided_regex`, `guided_choice`,
  `guided_grammar` (removed in vLLM 0.12, still sent by older clients).
At most one constraint per request (a forced tool call is one too: validation.constraint_of);
two are refused naming both fields. Each refusal names its field (`response_format`,
`structured_outputs.regex`, `guided_json`, ...), and so does a grammar that does not compile
(the gateway compiles it before the engine sees the request: EngineClient.check).
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from actors.serving.openai_body import Body
from model.constraint import JSON_OBJECT, Constraint
from model.errors import InvalidRequest

# OpenAI's rule for a response format's name
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class JsonSchemaFormat(Body):
    """`response_format.json_schema`, OpenAI's ResponseFormatJSONSchema.JSONSchema."""
    name: str
    schema_: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None              # accepted; every schema is enforced here
    description: str | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Body):
    """vLLM's `structured_outputs` (StructuredOutputsParams): exactly one key set."""
    json_: dict | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(Body):
    """The structured-output fields of a request (a base of both request models)."""
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | bool | str | None = None      # vLLM's older names
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


def _json(schema: dict | bool | str, field: str) -> Constraint:
    """A JSON schema given as an object or as its JSON text (vLLM takes both)."""
    if isinstance(schema, str):
        return Constraint("json", schema, field)
    return Constraint.json_schema(schema, field)


def response_format_constraint(f: ResponseFormat | None) -> Constraint | None:
    """The constraint of OpenAI's `response_format` (None for text)."""
    if f is None or f.type == "text":
        if f is not None and f.json_schema is not None:
            raise InvalidRequest("response_format.json_schema: set only with type "
                                 "\"json_schema\"")
        return None
    if f.type == "json_object":
        return Constraint("json", JSON_OBJECT, "response_format")
    s = f.json_schema
    if s is None:
        raise InvalidRequest("response_format.json_schema: required with type \"json_schema\"")
    if not _NAME.fullmatch(s.name):
        raise InvalidRequest("response_format.json_schema.name: must be 1 to 64 of a-z, A-Z, "
                             f"0-9, _ and -, got {s.name[:80]!r}")
    if s.schema_ is None:
        raise InvalidRequest("response_format.json_schema.schema: required (the JSON Schema "
                             "the completion must match)")
    return _json(s.schema_, "response_format")


def structured_outputs_constraints(s: StructuredOutputs | None) -> list[Constraint | None]:
    """The constraints set in vLLM's `structured_outputs`, each named by its key; an object
    with no key set (`{}`) is refused, as vLLM refuses it."""
    if s is None:
        return []
    if all(getattr(s, name) is None for name in s.model_fields_set):    # {} or nulls alone
        raise InvalidRequest("structured_outputs: set one of json, regex, choice, grammar, "
                             "json_object (the object is empty)")
    f = "structured_outputs"
    return [None if s.json_ is None else _json(s.json_, f"{f}.json"),
            None if s.regex is None else Constraint("regex", s.regex, f"{f}.regex"),
            None if s.choice is None else Constraint.choice(s.choice, f"{f}.choice"),
            None if s.grammar is None else Constraint("grammar", s.grammar, f"{f}.grammar"),
            Constraint("json", JSON_OBJECT, f"{f}.json_object") if s.json_object else None]


def guided_constraints(r: StructuredFields) -> list[Constraint | None]:
    """vLLM's older `guided_*` fields' constraints."""
    return [None if r.guided_json is None else _json(r.guided_json, "guided_json"),
            None if r.guided_regex is None else Constraint("regex", r.guided_regex,
                                                           "guided_regex"),
            None if r.guided_choice is None else Constraint.choice(r.guided_choice,
                                                                   "guided_choice"),
            None if r.guided_grammar is None else Constraint("grammar", r.guided_grammar,
                                                             "guided_grammar")]


def request_constraints(r: StructuredFields) -> list[Constraint | None]:
    """Every constraint request `r`'s structured-output fields set (None where unset); more
    than one is refused by validation.constraint_of, naming both."""
    return [response_format_constraint(r.response_format),
            *structured_outputs_constraints(r.structured_outputs), *guided_constraints(r)]
