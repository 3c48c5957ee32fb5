"""The OpenAI HTTP API's chat messages: their request model (text, text parts, an assistant's
`tool_calls`, a tool result's `tool_call_id`, and what an SDK's replayed message carries) and
the dicts model/chat.py and model/tools.py read. Pure; the rest of a request is
actors/serving/openai_api.py's."""
from __future__ import annotations

from typing import Literal

from actors.serving.openai_body import Body
from model.errors import InvalidRequest


def refuse(ok: bool, field: str, message: str) -> None:
    """InvalidRequest("<field>: <message>") unless `ok`."""
    if not ok:
        raise InvalidRequest(f"{field}: {message}")


class ChatContentPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: str
    content: str | list[ChatContentPart] | None = None  # null: an assistant's with tool_calls
    name: str | None = None
    tool_call_id: str | None = None             # role "tool": the call it answers
    tool_calls: list | None = None              # an assistant's calls (OpenAI's shape)
    # what an SDK's assistant message carries back (`message.model_dump()`): accepted null or
    # empty and ignored (message_dicts refuses the rest by name; annotations: any, ignored)
    refusal: str | None = None
    function_call: dict | None = None
    audio: dict | None = None
    annotations: list | None = None

    def text(self) -> str | None:
        """The content; text parts joined with "\\n", as vLLM and llama.cpp join them."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        """The message as model/chat.py and model/tools.py read it: role, content (text or
        None) and, where set, tool_calls and tool_call_id."""
        extras = {"tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id}
        return {"role": self.role, "content": self.text(),
                **{k: v for k, v in extras.items() if v}}


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The messages as dicts (model/chat.py, model/tools.py); what no path reads is refused
    by name."""
    for i, m in enumerate(messages):
        for field in ("function_call", "audio", "refusal"):
            refuse(not getattr(m, field), f"messages[{i}].{field}",
                   "only null or empty is accepted (this server has no audio or refusals; "
                   "tools go in tools and tool_calls)")
        refuse(m.content is not None or (m.role == "assistant" and m.tool_calls),
               f"messages[{i}].content", "required (null only on an assistant message with "
               "tool_calls)")
    return [m.as_dict() for m in messages]


def uses_tools(tools: list | None, tool_choice: str | dict | None,
               messages: list[dict]) -> bool:
    """Whether model/tools.py reads this chat (validation.tools_inputs): tools, a
    tool_choice, or tool turns in its messages."""
    return bool(tools or tool_choice not in (None, "none")
                or any(m["role"] == "tool" or "tool_calls" in m for m in messages))
