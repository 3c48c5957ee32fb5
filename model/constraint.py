"""What a structured-output request constrains its completion to: one value type for every API.

The OpenAI API's `response_format` and vLLM's `structured_outputs` / `guided_*` fields, gRPC's
`constraint` oneof and the tool-call grammars (model/tools.py) all become one `Constraint`,
carried by `SamplingParams.constraint` to the engine, which compiles it with llguidance
(model/grammar.py) and masks each constrained sequence's logits with it.

Kinds (`spec` is text in every kind, so a constraint is hashable and compiled grammars are
cached by content):
- "json":    a JSON Schema as JSON text; `{"type": "object"}` is OpenAI's json_object mode.
- "regex":   a regular expression the whole completion matches (Rust regex syntax, as
             llguidance reads it).
- "choice":  a JSON list of the strings the completion is exactly one of.
- "grammar": a Lark grammar in llguidance's dialect (which also reads `%json {...}` and
             `<[token id]>` for a control token).
`field` names the request field it came from ("response_format", "structured_outputs.regex",
"tool_choice", ...): every refusal of the constraint names it. It is not part of equality.
"""
from __future__ import annotations

import dataclasses
import json

from model.errors import InvalidRequest, check_json_depth, parse_json

KINDS = ("json", "regex", "choice", "grammar")
MAX_CONSTRAINT_CHARS = 65536    # the largest spec accepted, in characters (documented: docs/api.md)
MAX_CHOICES = 1024              # strings in a "choice" constraint

__all__ = ["Constraint", "KINDS", "MAX_CONSTRAINT_CHARS", "MAX_CHOICES", "JSON_OBJECT"]


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A validated constraint; InvalidRequest naming `field` if the kind, the spec's type or its
    size is wrong (whether it compiles is llguidance's to say: model/grammar.py)."""
    kind: str
    spec: str
    field: str = dataclasses.field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"{self.field}: unknown constraint kind {self.kind!r}; "
                                 f"expected one of {', '.join(KINDS)}")
        if not isinstance(self.spec, str) or not self.spec:
            raise InvalidRequest(f"{self.field}: the {self.kind} constraint must be a non-empty "
                                 f"string, got {type(self.spec).__name__}")
        if len(self.spec) > MAX_CONSTRAINT_CHARS:
            raise InvalidRequest(f"{self.field}: the {self.kind} constraint is {len(self.spec)} "
                                 f"characters; the limit is {MAX_CONSTRAINT_CHARS}")
        if self.kind == "json":
            self._check_json_schema()
        elif self.kind == "choice":
            self._check_choices()

    def _check_json_schema(self) -> None:
        schema = parse_json(self.spec, self.field, "the JSON schema is not valid JSON")
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest(f"{self.field}: a JSON schema must be an object (or a boolean), "
                                 f"got {type(schema).__name__}")

    def _check_choices(self) -> None:
        choices = parse_json(self.spec, self.field, "choices are not a JSON list")
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise InvalidRequest(f"{self.field}: choices must be a non-empty list of non-empty "
                                 "strings")
        if len(choices) > MAX_CHOICES:
            raise InvalidRequest(f"{self.field}: {len(choices)} choices; the limit is "
                                 f"{MAX_CHOICES}")

    @classmethod
    def json_schema(cls, schema: dict | bool, field: str) -> Constraint:
        """From a schema object (its canonical JSON text: key order kept, no spaces);
        JsonTooDeep naming `field` past MAX_JSON_DEPTH levels."""
        check_json_depth(schema, field)
        return cls("json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), field)

    @classmethod
    def choice(cls, choices: list[str], field: str) -> Constraint:
        if not isinstance(choices, list):
            raise InvalidRequest(f"{field}: choices must be a list of strings, got "
                                 f"{type(choices).__name__}")
        return cls("choice", json.dumps(choices, ensure_ascii=False), field)


JSON_OBJECT = '{"type":"object"}'   # OpenAI's response_format {"type": "json_object"}
