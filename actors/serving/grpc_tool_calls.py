"""Tool calls in gRPC responses: a choice's completion read by its ToolCallParser (model/tools.py)
into content text and `ToolCall` messages.

Generate: each call whole (`id`, `name`, the whole `arguments`), `text` the content outside the
calls. GenerateStream: a call's first ToolCall entry has its `id` and `name` (and arguments ""
or a first piece), the later entries of that `index` the argument pieces; a choice's last
message tops the stream up to what the parser's `finish()` says (content held back while it
might have begun a call, a call seen whole only at the end), so the pieces join to the unary
response exactly. A choice that made calls and stopped (EOS or its grammar's end) finishes
"tool_calls"; one cut by max_tokens stays "length".
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from model.tools import ToolCall, ToolCallDelta, ToolCallParser
from protos import generator_pb2 as pb

TOOL_CALLS = "tool_calls"       # the finish_reason of a choice that stopped after making calls


def finish_reason_of(reason: str | None, calls: Sequence[ToolCall]) -> str | None:
    """A choice's finish reason with its calls: "tool_calls" for "stop" with calls."""
    return TOOL_CALLS if reason == "stop" and calls else reason


def whole_calls(calls: Sequence[ToolCall]) -> list[pb.ToolCall]:
    """The ToolCall messages of a choice's finished calls, indexed in order."""
    return [pb.ToolCall(index=i, id=c.id, name=c.name, arguments=c.arguments)
            for i, c in enumerate(calls)]


def read_completion(parser: ToolCallParser, token_ids: Sequence[int],
                    text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole completion."""
    parser.push(token_ids, text)
    return parser.finish()


class _Sent:
    """What one choice's stream has sent so far: its content text and, per call index, the
    call's arguments text (a call is in `arguments` once its id was sent)."""

    def __init__(self):
        self.content = ""
        self.arguments: dict[int, str] = {}

    def entries(self, pieces: Sequence[str | ToolCallDelta]) -> tuple[str, list[pb.ToolCall]]:
        """(text, ToolCall entries) of a parser's pieces, remembered as sent."""
        text, entries = "", []
        for p in pieces:
            if isinstance(p, str):
                text += p
                continue
            self.arguments[p.index] = self.arguments.get(p.index, "") + p.arguments
            entries.append(pb.ToolCall(index=p.index, id=p.id or "", name=p.name or "",
                                       arguments=p.arguments))
        self.content += text
        return text, entries

    def rest(self, content: str, calls: Sequence[ToolCall]) -> tuple[str, list[pb.ToolCall]]:
        """(text, ToolCall entries) still to send so that the stream joins to (content, calls):
        what the parser held back until its end."""
        text = content[len(self.content):] if content.startswith(self.content) else ""
        entries = []
        for i, c in enumerate(calls):
            begun, sent = i in self.arguments, self.arguments.get(i, "")
            args = c.arguments[len(sent):] if c.arguments.startswith(sent) else ""
            if not begun or args:
                entries.append(pb.ToolCall(index=i, id="" if begun else c.id,
                                           name="" if begun else c.name, arguments=args))
        return text, entries


class ToolCallStreams:
    """One stream's parsers, a new one per choice (`new_parser`), each fed its choice's chunks."""

    def __init__(self, new_parser: Callable[[], ToolCallParser]):
        self.new_parser = new_parser
        self.choices: dict[int, tuple[ToolCallParser, _Sent]] = {}

    def read(self, index: int, token_ids: Sequence[int], text: str,
             finish_reason: str | None) -> tuple[str, list[pb.ToolCall], str | None]:
        """(text, ToolCall entries: one per call it touches, finish reason) of choice `index`'s
        next chunk."""
        if index not in self.choices:
            self.choices[index] = self.new_parser(), _Sent()
        parser, sent = self.choices[index]
        out, entries = sent.entries(parser.push(token_ids, text))
        if not finish_reason:
            return out, _joined(entries), finish_reason
        content, calls = parser.finish()
        rest, more = sent.rest(content, calls)
        return out + rest, _joined(entries + more), finish_reason_of(finish_reason, calls)


def _joined(entries: list[pb.ToolCall]) -> list[pb.ToolCall]:
    """One entry per call: a later entry's arguments joined onto the call's first."""
    out: dict[int, pb.ToolCall] = {}
    for e in entries:
        if e.index in out:
            out[e.index].arguments += e.arguments
        else:
            out[e.index] = e
    return list(out.values())
