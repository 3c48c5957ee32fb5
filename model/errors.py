"""The errors a request can meet that are not the server's fault, shared by every layer.

`InvalidRequest` is the one class for "this request's input is outside its limits": the
sampling parameters, the engine's admission checks and the chat template raise it (or a
subclass) with a message naming the field and the limit, and only it maps to gRPC
INVALID_ARGUMENT / HTTP 400. Any other exception is the server's: INTERNAL, with no text.
`CheckpointError` is the other input's: a model directory the server is given to load.
"""
from __future__ import annotations

import json

MAX_JSON_DEPTH = 128    # nesting levels of client JSON (documented: docs/api.md, "Limits")


class InvalidRequest(ValueError):
    """A request field is outside its limits; the message names the field and the limit."""


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape or is malformed; names the tensor."""


def lone_surrogate_at(text: str) -> int | None:
    """The index of the first lone surrogate (U+D800..U+DFFF) in `text`, None if there is none.
    A JSON string may spell one (`"a\\ud800b"`), a Python str may hold one; neither is Unicode
    text (no UTF-8 spells it) and the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def surrogate_message(field: str, text: str, at: int) -> str:
    """The refusal of a text holding a lone surrogate at `at`; it never quotes the text."""
    return (f"{field}: holds a lone surrogate (U+{ord(text[at]):04X} at character {at}), which "
            "is not Unicode text: send each character whole (both halves of a surrogate pair)")


def check_unicode(field: str, text: str) -> None:
    """InvalidRequest naming `field` if `text` holds a lone surrogate."""
    at = lone_surrogate_at(text)
    if at is not None:
        raise InvalidRequest(surrogate_message(field, text, at))


class JsonTooDeep(InvalidRequest):
    """Client JSON nested more than MAX_JSON_DEPTH levels (arrays and objects)."""


def too_deep(field: str) -> JsonTooDeep:
    return JsonTooDeep(f"{field}: nested more than {MAX_JSON_DEPTH} levels of arrays and "
                       "objects (the limit)")


def parse_json(text: str, field: str, invalid: str = "not valid JSON"):
    """The value of client JSON `text`: every place that parses a client's JSON text goes
    through here, so no input is a RecursionError (a 500). InvalidRequest naming `field`:
    "<field>: <invalid>: <json's reason>", or JsonTooDeep when it nests more than
    MAX_JSON_DEPTH levels (`"[" * 5000` is that, valid or not: json gives up on it)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep(field) from None
    except ValueError as e:
        raise InvalidRequest(f"{field}: {invalid}: {e}") from None
    check_json_depth(value, field)
    return value


def check_json_depth(value, field: str) -> None:
    """JsonTooDeep naming `field` if a client's JSON value (dicts, lists, scalars) nests more
    than MAX_JSON_DEPTH levels (`{}` is 1, a scalar 0): checked before json.dumps of a client's
    structure, which would recurse as deep. Iterative; O(nodes)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise too_deep(field)
        children = node.values() if isinstance(node, dict) else node
        stack += [(c, depth + 1) for c in children if isinstance(c, (dict, list))]


class QueueFull(RuntimeError):
    """More requests are waiting than `max_waiting`: try again later (RESOURCE_EXHAUSTED)."""
