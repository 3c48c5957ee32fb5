"""Tool calls in gRPC responses: a choice's completion read by its ToolCallParser (model/tools.py)
into content text and `ToolCall` messages.

Generate: each call whole (`id`, `name`, the whole `arguments`), `text` the content outside the
calls. GenerateStream: a call's first ToolCall entry has its `id` and `name` (and arguments ""
or a first piece), the later entries of that `index` the argument pieces; a choice's last
message adds what the parser held back (`flush`: content held while it might have begun a
call), so the pieces join to the unary response exactly. A choice that made calls and stopped
(EOS or its grammar's end) finishes "tool_calls"; one cut by max_tokens stays "length"
(model.tools.finish_reason_of).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from model.tools import ToolCall, ToolCallDelta, ToolCallParser, finish_reason_of
from protos import generator_pb2 as pb


def whole_calls(calls: Sequence[ToolCall]) -> list[pb.ToolCall]:
    """The ToolCall messages of a choice's finished calls, indexed in order."""
    return [pb.ToolCall(index=i, id=c.id, name=c.name, arguments=c.arguments)
            for i, c in enumerate(calls)]


def read_completion(parser: ToolCallParser, token_ids: Sequence[int],
                    text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole completion."""
    parser.push(token_ids, text)
    return parser.finish()


def _entries(pieces: Sequence[str | ToolCallDelta]) -> tuple[str, list[pb.ToolCall]]:
    """(text, ToolCall entries) of a parser's pieces."""
    text = "".join(p for p in pieces if isinstance(p, str))
    return text, [pb.ToolCall(index=p.index, id=p.id or "", name=p.name or "",
                              arguments=p.arguments) for p in pieces if not isinstance(p, str)]


class ToolCallStreams:
    """One stream's parsers, a new one per choice (`new_parser`), each fed its choice's chunks."""

    def __init__(self, new_parser: Callable[[], ToolCallParser]):
        self.new_parser = new_parser
        self.choices: dict[int, ToolCallParser] = {}

    def read(self, index: int, token_ids: Sequence[int], text: str,
             finish_reason: str | None) -> tuple[str, list[pb.ToolCall], str | None]:
        """(text, ToolCall entries: one per call it touches, finish reason) of choice `index`'s
        next chunk."""
        if index not in self.choices:
            self.choices[index] = self.new_parser()
        parser = self.choices[index]
        pieces = parser.push(token_ids, text)
        if finish_reason:
            pieces += parser.flush()
            finish_reason = finish_reason_of(finish_reason, parser.finish()[1],
                                             parser.complete)
        out, entries = _entries(pieces)
        return out, _joined(entries), finish_reason


def _joined(entries: list[pb.ToolCall]) -> list[pb.ToolCall]:
    """One entry per call: a later entry's arguments joined onto the call's first."""
    out: dict[int, pb.ToolCall] = {}
    for e in entries:
        if e.index in out:
            out[e.index].arguments += e.arguments
        else:
            out[e.index] = e
    return list(out.values())
