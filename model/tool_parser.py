"""A completion's text -> content and OpenAI tool calls, as it streams (one parser per choice).

Contract: `ToolCallParser.push(token_ids, text)` takes the completion in pieces (the ids of a
chunk and the text they add) and returns content text (str) and `ToolCallDelta`s in order;
`flush()` returns what was held back at the end; `finish()` gives (content, calls). Whatever the
split into pieces, the pieces of `push` and `flush` join to `finish()`'s: the content text, and
each call's deltas to its arguments exactly (a stream sends them; a whole reply reads finish()).

The call list is Mistral's, in json.dumps's layout (what the grammars force and Mistral's
models write): `[{"name": "f", "arguments": {...}}, {"name": "g", "arguments": {...}}]`.
- On a native vocabulary the list must open the completion with the [TOOL_CALLS] token (only
  whitespace may come before it); a completion that does not is plain content (its tokens decode
  [TOOL_CALLS] as "").
- Forced calls (tool_choice "required" or a function; grammar-made, so well-formed): each
  call's first delta carries its id and name with arguments "", then the arguments stream in
  pieces as they come. The reply is calls only: cut short (max_tokens, finish_reason
  "length"), a call whose head `{"name": "f", "arguments": ` came whole keeps the arguments
  generated so far ("" or JSON that may not parse), and a head cut short is dropped.
- `auto` (the model may answer with text): each call is held until it is complete and its
  arguments are a JSON object, then sent as two deltas (id + name, then the arguments). Text
  that is not a well-formed call list (random weights, a name not among the tools) is
  content: all of it if no call came yet, else from where it went wrong.
Call ids are made here: 9 alphanumeric characters (mistral-common's v3 rule).
"""
from __future__ import annotations

import dataclasses
import re
import secrets
import string
from collections.abc import Callable, Collection, Sequence

from model.errors import InvalidRequest, parse_json

CALL_ID_CHARS = string.ascii_letters + string.digits
HEAD_START = '{"name": "'
HEAD_END = '", "arguments": '
HEAD = re.compile(r'\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')
NAME_CHARS = re.compile(r"[a-zA-Z0-9_-]*")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call; `arguments` is the JSON text of an object (cut short, possibly "", only when a
    forced call's completion was: finish_reason "length")."""
    id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """OpenAI's streamed piece of call `index`: the first has id and name (arguments ""), the
    others arguments text only."""
    index: int
    id: str | None
    name: str | None
    arguments: str


TOOL_CALLS = "tool_calls"       # the finish_reason of a choice that stopped after making calls


def finish_reason_of(reason: str | None, calls: Sequence[ToolCall],
                     complete: bool = True) -> str | None:
    """A choice's finish reason with its calls, as OpenAI's: "tool_calls" where it would be
    "stop" (EOS, or its grammar's end) and it made calls; "length" (cut by max_tokens) stays,
    and so does "stop" when the call list is not `complete` (a stop string cut it:
    ToolCallParser.complete)."""
    return TOOL_CALLS if reason == "stop" and calls and complete else reason


def new_call_id() -> str:
    """9 random alphanumeric characters."""
    return "".join(secrets.choice(CALL_ID_CHARS) for _ in range(9))


class _Arguments:
    """Where a JSON object's text ends: nesting depth outside strings."""

    def __init__(self):
        self.depth, self.in_string, self.escaped = 0, False, False

    def take(self, text: str) -> int:
        """How many characters of `text` belong to the object (all of them while it is open);
        -1 if the value does not start with '{'."""
        for k, ch in enumerate(text):
            if self.depth == 0 and ch != "{":
                return -1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return k + 1
        return len(text)


class ToolCallParser:
    """See the module docstring. `names`: the tools' names; `forced`: the grammar made the
    list; `marker_id`: the [TOOL_CALLS] id on a native vocabulary (None on v1, where a forced
    completion is the list itself)."""

    def __init__(self, names: Collection[str], forced: bool, marker_id: int | None,
                 new_id: Callable[[], str] = new_call_id):
        self.names, self.forced, self.marker_id, self.new_id = set(names), forced, marker_id, new_id
        self.state = "open" if marker_id is None else "start"
        self.buf = ""           # text not yet read
        self.held = ""          # text read but not sent (auto: the call being read)
        self.calls: list[ToolCall] = []
        self.content: list[str] = []
        self.args: _Arguments | None = None
        self.done = False

    def push(self, token_ids: Sequence[int], text: str) -> list[str | ToolCallDelta]:
        if self.state == "start":
            if self.marker_id in token_ids:
                self.state = "open"
            elif text.strip():
                self.state = "content"
        self.buf += text
        out: list[str | ToolCallDelta] = []
        while self.buf and self._step(out):
            pass
        return out

    def _step(self, out: list) -> bool:
        """Reads from `buf` in the current state; False when it must wait for more text."""
        if self.state in ("start", "content", "end"):
            if self.state == "start":
                return False                        # whitespace before any marker: wait
            self._send_content(self.buf, out)
            self.buf = ""
            return False
        if self.state == "open":
            stripped = self.buf.lstrip()
            if not stripped:
                return False
            if stripped[0] != "[":
                return self._deviate(out)
            self.held += self.buf[:len(self.buf) - len(stripped) + 1]
            self.buf, self.state = stripped[1:], "head"
            return True
        return getattr(self, f"_{self.state}")(out)

    def _head(self, out: list) -> bool:
        match = HEAD.match(self.buf)
        if match is None:
            return not self._could_be_head(self.buf) and self._deviate(out)
        if match.group(1) not in self.names:
            return self._deviate(out)
        self.calls.append(ToolCall(self.new_id(), match.group(1), ""))
        self.held += match.group(0)
        self.buf, self.state, self.args = self.buf[match.end():], "arguments", _Arguments()
        if self.forced:
            self._send_call_start(out)
        return True

    @staticmethod
    def _could_be_head(text: str) -> bool:
        """Whether more text could still make `text` a call's head."""
        if len(text) <= len(HEAD_START):
            return HEAD_START.startswith(text)
        if not text.startswith(HEAD_START):
            return False
        name = NAME_CHARS.match(text, len(HEAD_START)).group(0)
        rest = text[len(HEAD_START) + len(name):]
        return len(name) <= 64 and (not rest or (bool(name) and HEAD_END.startswith(rest)))

    def _arguments(self, out: list) -> bool:
        taken = self.args.take(self.buf)
        if taken < 0:
            return self._deviate(out)
        piece, self.buf = self.buf[:taken], self.buf[taken:]
        call = self.calls[-1]
        self.calls[-1] = dataclasses.replace(call, arguments=call.arguments + piece)
        if self.forced:
            out.append(ToolCallDelta(len(self.calls) - 1, None, None, piece))
        else:
            self.held += piece
        if self.args.depth == 0:
            self.state = "next"
        return True

    def _next(self, out: list) -> bool:
        for sep, state in (("}, ", "head"), ("}]", "end")):
            if self.buf.startswith(sep):
                if not self.forced and not _is_object(self.calls[-1].arguments):
                    return self._deviate(out)
                if not self.forced:
                    self._send_call_start(out)
                    out.append(ToolCallDelta(len(self.calls) - 1, None, None,
                                             self.calls[-1].arguments))
                self.buf, self.state, self.held = self.buf[len(sep):], state, ""
                return True
        if "}, ".startswith(self.buf) or "}]".startswith(self.buf):
            return False
        return self._deviate(out)

    def _send_call_start(self, out: list) -> None:
        call = self.calls[-1]
        out.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name, ""))

    def _send_content(self, text: str, out: list) -> None:
        if text:
            self.content.append(text)
            out.append(text)

    def _deviate(self, out: list) -> bool:
        """Not a well-formed call list from here: what was held and what follows is content;
        a call not yet sent is dropped."""
        if not self.forced and self.state in ("arguments", "next"):
            self.calls.pop()
        self._send_content(self.held + self.buf, out)
        self.held, self.buf, self.state = "", "", "content"
        return False

    @property
    def complete(self) -> bool:
        """False while a forced call list is unfinished (cut short: max_tokens, a stop
        string); an `auto` reply's calls are each complete."""
        return not self.forced or self.state in ("end", "content")

    def flush(self) -> list[str | ToolCallDelta]:
        """At the end of the completion: what was held back (content text, or nothing)."""
        out: list[str | ToolCallDelta] = []
        if self.done:
            return out
        self.done = True
        if self.forced and self.state in ("start", "open", "head", "arguments", "next"):
            self.held = self.buf = ""   # cut short: begun calls keep what came, a head is dropped
        elif self.state not in ("content", "end"):
            self._deviate(out)                      # auto: a call not complete is content
        self._send_content(self.buf, out)
        self.buf = ""
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content, calls): content is "" when the completion was only calls."""
        self.flush()
        return "".join(self.content), list(self.calls)


def _is_object(text: str) -> bool:
    """Whether the model's `text` is a JSON object (nested too deep for json: it is not)."""
    try:
        return isinstance(parse_json(text, "arguments"), dict)
    except InvalidRequest:
        return False
