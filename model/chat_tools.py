"""Tool conversations in a prompt: mistral-common's v3 tokens, or text for a v1 template.

Contract:
- `encode_v3(tokenizer, messages, tools)` is the prompt's ids on a vocabulary with Mistral's
  control tokens ([INST], [TOOL_CALLS], [AVAILABLE_TOOLS], [TOOL_RESULTS], ...): exactly
  `MistralTokenizer.v3().encode_chat_completion(ChatCompletionRequest(messages, tools))`
  for every conversation model/chat.py's rules allow (tests/unit/test_tools.py checks it
  property-based), with `tools` in OpenAI's shape. Plain chats too: on v3 the system prompt
  goes before the LAST user message, and [INST] / [/INST] are control ids.
- `plain_messages(messages)` writes tool calls and results as text, for a template that has no
  tool tokens (v1); docs/api.md "Tool calling" shows the text.
- Tool call ids: mistral-common's v3 format takes 9 alphanumeric characters; a client's id of
  another shape ("call_abc123") is mapped by `mistral_call_id` (deterministic), in calls and
  results alike.
"""
from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence

from model.chat import CALL_ID, SYSTEM_ROLES, json_value, validate_messages

TOOL_RESULTS_PREFIX = "Tool results: "
BASE62 = string.digits + string.ascii_letters
# The control tokens of Mistral's v3 instruct format, by the name of their piece.
V3_CONTROLS = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
               "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


def _calls(message: dict) -> list:
    """An assistant message's tool calls ([] when it has none)."""
    return message.get("tool_calls") or []


def calls_text(calls: list[dict]) -> str:
    """OpenAI tool calls as Mistral's call list, `[{"name": "f", "arguments": {...}}]` (the text a
    forced call generates; json.dumps's layout)."""
    return json.dumps([{"name": c["function"]["name"],
                        "arguments": json_value(c["function"]["arguments"])} for c in calls],
                      ensure_ascii=False)


def plain_messages(messages: list[dict]) -> list[dict]:
    """Validated messages for a template without tool tokens (v1): "developer" is "system", an
    assistant's tool calls are its content (`calls_text`), and the results that answer them
    are one user message `Tool results: [{"name": "f", "content": ...}, ...]`, joined by a
    blank line to a user message that follows."""
    out, names, results = [], {}, []
    for message in messages:
        role = "system" if message["role"] in SYSTEM_ROLES else message["role"]
        if role == "tool":
            results.append({"name": names[message["tool_call_id"]],
                            "content": json_value(message["content"])})
            continue
        if results:
            out.append({"role": "user", "content": TOOL_RESULTS_PREFIX
                        + json.dumps(results, ensure_ascii=False)})
            results = []
            if role == "user":
                out[-1]["content"] += "\n\n" + message["content"]
                continue
        if role == "assistant" and _calls(message):
            names.update((c["id"], c["function"]["name"]) for c in message["tool_calls"])
            out.append({"role": role, "content": calls_text(message["tool_calls"])})
        else:
            out.append({"role": role, "content": message["content"]})
    if results:
        out.append({"role": "user", "content": TOOL_RESULTS_PREFIX
                    + json.dumps(results, ensure_ascii=False)})
    return out


def mistral_call_id(call_id: str) -> str:
    """The 9 alphanumeric characters mistral-common's v3 format requires of a tool call id: the
    id itself when it is such, else the first 9 base-62 digits of its SHA-256 (deterministic,
    so a call and the result naming it map alike: "call_abc123" -> the same 9 characters)."""
    if CALL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest(), "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return "".join(digits)


def encode_v3(tokenizer, messages: list[dict], tools: Sequence[dict] = ()) -> list[int]:
    """Token ids of a v3 chat prompt (see the module docstring); ChatTemplateError if `messages`
    break the rules. `tokenizer` is a model.tokenizer.Tokenizer whose `control_id` knows
    V3_CONTROLS; `tools` are OpenAI tool dicts ({"type": "function", "function": {"name",
    "description", "parameters"}}, in that key order)."""
    validate_messages(messages)
    c = {name: tokenizer.control_id(name) for name in V3_CONTROLS}
    system = messages[0]["content"] if messages[0]["role"] in SYSTEM_ROLES else ""
    turns = messages[1:] if messages[0]["role"] in SYSTEM_ROLES else messages
    last_user = max(k for k, m in enumerate(turns) if m["role"] == "user")

    def text(value: str) -> list[int]:
        return tokenizer.encode(value, bos=False)

    ids = [tokenizer.bos_id]
    for k, message in enumerate(turns):
        if message["role"] == "user":
            content = message["content"]
            if k == last_user:
                if tools:
                    ids += [c["[AVAILABLE_TOOLS]"],
                            *text(json.dumps(list(tools), ensure_ascii=False)),
                            c["[/AVAILABLE_TOOLS]"]]
                content = f"{system}\n\n{content}" if system else content
            ids += [c["[INST]"], *text(content), c["[/INST]"]]
        elif message["role"] == "tool":
            result = {"content": json_value(message["content"]),
                      "call_id": mistral_call_id(message["tool_call_id"])}
            ids += [c["[TOOL_RESULTS]"], *text(json.dumps(result, ensure_ascii=False)),
                    c["[/TOOL_RESULTS]"]]
        elif _calls(message):
            calls = [{"name": call["function"]["name"],
                      "arguments": json_value(call["function"]["arguments"]),
                      "id": mistral_call_id(call["id"])} for call in message["tool_calls"]]
            ids += [c["[TOOL_CALLS]"], *text(json.dumps(calls, ensure_ascii=False)),
                    tokenizer.eos_id]
        else:
            ids += [*text(message["content"].rstrip(" ")), tokenizer.eos_id]
    return ids
