"""A Constraint (model/constraint.py) as llguidance's grammar text; model/grammar.py compiles it.

Kinds -> llguidance grammars: "json" through `grammar_from_json_schema` with JSON_OPTIONS
(json.dumps's default layout, no free whitespace: random weights cannot run on in spaces; the
boolean schema `true` is `{}`, any JSON, and `false` is refused: it matches no document),
"regex" through `grammar_from_regex` (the whole completion matches), "choice" as a Lark
alternative of the exact strings (JSON-escaped: a Lark string literal reads JSON's escapes; DEL,
which llguidance's lexer refuses raw, as `\\u007f`), "grammar" as the user's Lark.
"""
from __future__ import annotations

import json

import llguidance as llg

from model.constraint import Constraint

__all__ = ["JSON_OPTIONS", "GrammarError", "grammar_text", "with_leading_space"]

# json.dumps's layout: ", " between items, ": " after keys, no other whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_WRAP = 'start: " "? @inner'        # an optional leading space, then the grammar named inner


class GrammarError(ValueError):
    """llguidance refused a grammar; the message is its reason (the field is added by the
    caller of GrammarCompiler.compile)."""


def grammar_text(c: Constraint) -> str:
    """llguidance's grammar for a constraint, as its JSON grammar text (`{"grammars": [...]}`),
    not checked (GrammarCompiler does that). GrammarError if a JSON schema's text is refused
    before compiling."""
    if c.kind == "json":
        schema = {"true": "{}", "false": None}.get(c.spec.strip(), c.spec)   # boolean schemas
        if schema is None:
            raise GrammarError("the JSON schema false matches no document")
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(str(e)) from None
    if c.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(c.spec)
    lark = c.spec
    if c.kind == "choice":
        lark = "start: " + " | ".join(_lark_literal(s) for s in json.loads(c.spec))
    return json.dumps({"grammars": [{"lark_grammar": lark}]})


def _lark_literal(text: str) -> str:
    """A Lark string literal of exactly `text`: JSON's escapes (Lark reads them), non-ASCII
    kept raw but for DEL, which llguidance's lexer refuses raw."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def with_leading_space(grammar: str) -> str:
    """`grammar` (llguidance's JSON grammar text) behind an optional leading space:
    `start: " "? <grammar>` (model/grammar.py says when and why)."""
    grammars = json.loads(grammar)["grammars"]
    return json.dumps({"grammars": [{"lark_grammar": _WRAP},
                                    {**grammars[0], "name": "inner"}, *grammars[1:]]})
