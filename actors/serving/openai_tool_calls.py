"""A chat choice's tool calls in OpenAI's response shapes, read from its completion by a
model.tools.ToolCallParser (one per choice). Pure; used by actors/serving/openai_responses.py.

- Whole: `message = {"role": "assistant", "content", "tool_calls": [{"id", "type":
  "function", "function": {"name", "arguments"}}]}`, `content` null when the reply is only
  calls, and `finish_reason: "tool_calls"` where it would be "stop".
- Streamed: `delta.tool_calls = [{"index", "id", "type", "function": {"name", "arguments"}}]`
  on a call's first piece (its id and name, arguments "" or more), then `[{"index",
  "function": {"arguments"}}]` pieces, as OpenAI streams them; a chunk carries one entry per
  call it touches (its pieces joined). The choice's last chunk adds what the parser held back
  (`flush`), so the streamed content and arguments concatenate to the whole reply's.
"""
from __future__ import annotations

from model.output import Completion, StreamChunk
from model.tools import ToolCall, ToolCallDelta, ToolCallParser, finish_reason_of


def call_body(call: ToolCall) -> dict:
    """OpenAI's ChatCompletionMessageToolCall."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def delta_body(d: ToolCallDelta) -> dict:
    """OpenAI's ChoiceDeltaToolCall: id, type and name only on a call's first piece."""
    if d.id is None:
        return {"index": d.index, "function": {"arguments": d.arguments}}
    return {"index": d.index, "id": d.id, "type": "function",
            "function": {"name": d.name, "arguments": d.arguments}}


def _joined(deltas: list[ToolCallDelta]) -> list[dict]:
    """The delta bodies of one chunk, one per call: a call's pieces joined onto its first."""
    out: dict[int, dict] = {}
    for d in deltas:
        if d.index in out:
            out[d.index]["function"]["arguments"] += d.arguments
        else:
            out[d.index] = delta_body(d)
    return list(out.values())


class ChoiceCalls:
    """One choice's reply through its parser, whole or chunk by chunk (not both)."""

    def __init__(self, parser: ToolCallParser):
        self.parser = parser

    def message(self, c: Completion) -> tuple[dict, str | None]:
        """(the whole reply's message, its finish_reason)."""
        self.parser.push(c.token_ids, c.text)
        content, calls = self.parser.finish()
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = [call_body(call) for call in calls]
        return message, finish_reason_of(c.finish_reason, calls, self.parser.complete)

    def delta(self, c: StreamChunk) -> tuple[dict, str | None]:
        """(a chunk's delta, less its role; its finish_reason)."""
        pieces = self.parser.push(c.token_ids, c.text)
        reason = c.finish_reason
        if reason is not None:                    # what the parser held back
            pieces += self.parser.flush()
            reason = finish_reason_of(reason, self.parser.finish()[1], self.parser.complete)
        text = "".join(p for p in pieces if isinstance(p, str))
        deltas = [p for p in pieces if not isinstance(p, str)]
        delta: dict = {"content": text or None}
        if deltas:
            delta["tool_calls"] = _joined(deltas)
        return delta, reason
