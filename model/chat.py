"""Chat messages -> the text segments and control tokens of a prompt; THE chat role rules.

Contract: `ChatTemplate(source).render(messages)` first checks `messages` against the rules
below (`validate_messages`, the only place they live), then renders the Jinja template and
returns its output split into text segments and `BOS` / `EOS` markers; the tokenizer encodes
each segment without a dummy prefix (the template supplies the spaces). With
`DEFAULT_CHAT_TEMPLATE` the resulting ids equal mistral-common's
`MistralTokenizer.v1().encode_chat_completion` for every conversation these rules allow
(tests/unit/test_tokenizer.py checks it property-based). A checkpoint's own template (the
`chat_template` of its tokenizer_config.json) is rendered the same way; its `raise_exception`
raises `ChatTemplateError`.

The role rules (each error is a `ChatTemplateError` whose message starts with the field it
names, `messages[i].role`, `messages[i].content`, `messages[i].tool_calls[j].function.name`...):
1. `messages` is a non-empty list of dicts, each with a `role` of "system", "user",
   "assistant" or "tool" and a `content` that is a string holding no lone surrogate.
   "developer" is OpenAI's newer name for "system" and is that role here (the template sees
   "system"; errors name the role as sent).
2. Only the first message may be a system message. An empty system message means no system
   prompt; any other is prepended to the first user message (v1; the last one on v3),
   followed by a blank line.
3. After the optional system message, roles alternate user, assistant, user, ..., starting
   with user, and the last message is from the user (or is a tool result, rule 6).
4. An assistant message's content is not empty (whitespace alone is allowed) unless it has
   tool calls; user and tool content may be empty.
5. An assistant message may carry OpenAI's `tool_calls` instead of content (content null or
   ""; both is refused, as mistral-common does): `[{"id", "type": "function", "function":
   {"name", "arguments"}}]`, ids distinct and non-empty, names of 1-64 characters from a-z,
   A-Z, 0-9, "_", "-", arguments a string (JSON text; other text is kept as a string).
   Arguments and tool results that are JSON nest at most MAX_JSON_DEPTH levels
   (model/errors.py), as every client JSON does.
6. Such a message is followed by one `{"role": "tool", "content", "tool_call_id"}` message per
   call, each naming a call id of that message once; then an assistant or a user message.
mistral-common also rejects what rules 3 (last message) and 4 reject. Stricter than it (it
accepts these): a system message after the first, consecutive user or consecutive assistant
messages (it joins them with a blank line), an assistant first (it inserts an empty user
message), a conversation of a system message alone, and tool results that do not answer the
calls just made one by one (its v3 validator counts them only).

The template sees only system, user and assistant messages with text content: tool calls and
results are written as text first (model/chat_tools.py `plain_messages`), or, on a vocabulary
with tool tokens (v3), encoded as mistral-common does (model/chat_tools.py `encode_v3`).
"""
from __future__ import annotations

import enum
import re
import secrets

from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.errors import (
    InvalidRequest,
    JsonTooDeep,
    lone_surrogate_at,
    parse_json,
    surrogate_message,
)

# A pure renderer: the rules are checked before it runs.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_prompt, turns = messages[0]['content'], messages[1:] %}"
    "{%- else %}{%- set system_prompt, turns = '', messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_prompt %}"
    "{{- ' [INST] ' + system_prompt + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

ROLES = ("system", "developer", "user", "assistant", "tool")
SYSTEM_ROLES = ("system", "developer")          # OpenAI's "developer" is "system" here
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")             # mistral-common v3's tool call ids


class ChatTemplateError(InvalidRequest):
    """Messages that break the chat role rules; the message starts with the field it names."""


class Control(enum.Enum):
    BOS = "bos"
    EOS = "eos"


def template_from(config: dict) -> str:
    """The chat template of a tokenizer_config.json (a string or a list of named ones)."""
    template = config.get("chat_template") or DEFAULT_CHAT_TEMPLATE
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", DEFAULT_CHAT_TEMPLATE)
    return template


def _raise_exception(message: str):
    raise ChatTemplateError(f"messages: {message}")


class ChatTemplate:
    """A compiled Jinja chat template (sandboxed), e.g. `ChatTemplate(DEFAULT_CHAT_TEMPLATE)`."""

    def __init__(self, source: str):
        self.source = source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(source)

    def render(self, messages: list[dict]) -> list[str | Control]:
        """Text segments and control markers, in order; ChatTemplateError if the rules fail.

        `[{"role": "user", "content": "Hi"}]` -> `[Control.BOS, " [INST] Hi [/INST]"]`."""
        validate_messages(messages)
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
        bos, eos = (f"\x00{name}-{secrets.token_hex(16)}\x00" for name in ("bos", "eos"))
        text = self._template.render(messages=messages, bos_token=bos, eos_token=eos,
                                     add_generation_prompt=True)
        markers = {bos: Control.BOS, eos: Control.EOS}
        parts = re.split(f"({re.escape(bos)}|{re.escape(eos)})", text)
        return [markers.get(part, part) for part in parts if part]


def validate_messages(messages) -> None:
    """Rules 1-6 of the module docstring, checked message by message in order."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages: expected a non-empty list of {'role', 'content'} dicts")
    turns = _Turns()
    for i, message in enumerate(messages):
        _validate_shape(i, message)
        turns.advance(i, message)
    last = messages[-1]["role"]
    if last not in ("user", "tool"):
        raise ChatTemplateError(f"messages[{len(messages) - 1}].role: the last message must be "
                                f"from 'user', got {last!r}; after tool calls, their 'tool' "
                                "results may end it")
    turns.check_answered(len(messages) - 1)


class _Turns:
    """Rules 2, 3 and 6: which roles may come next, and the tool calls still awaiting results."""

    def __init__(self):
        self.expected = ("system", "user")
        self.pending: dict[str, int] = {}      # call id -> index of the assistant message
        self.calls_at = -1

    def advance(self, i: int, message: dict) -> None:
        role = "system" if message["role"] in SYSTEM_ROLES else message["role"]
        if role not in self.expected:
            self._refuse(i, message["role"])
        if role == "tool":
            self._answer(i, message["tool_call_id"])
        if role == "assistant" and _calls(message):
            self.pending = {call["id"]: i for call in message["tool_calls"]}
            self.calls_at = i
        self.expected = self._after(role)

    def _after(self, role: str) -> tuple[str, ...]:
        if role == "system":
            return ("user",)
        if role == "user":
            return ("assistant",)
        if self.pending:
            return ("tool",)
        return ("assistant", "user") if role == "tool" else ("user",)

    def _refuse(self, i: int, role: str) -> None:
        if role in SYSTEM_ROLES:
            raise ChatTemplateError(
                f"messages[{i}].role: a {role} message may only be the first message")
        if self.pending:
            raise ChatTemplateError(
                f"messages[{i}].role: expected 'tool', got {role!r}; the tool calls of "
                f"messages[{self.calls_at}] ({', '.join(map(repr, self.pending))}) need "
                "their results first, one 'tool' message each")
        expected = " or ".join(repr(r) for r in self.expected if r != "system")
        raise ChatTemplateError(
            f"messages[{i}].role: expected {expected}, got {role!r}; after an optional leading "
            "system message, roles alternate user/assistant starting with user (an assistant's "
            "tool calls are followed by their 'tool' results)")

    def _answer(self, i: int, call_id: str) -> None:
        if call_id not in self.pending:
            raise ChatTemplateError(
                f"messages[{i}].tool_call_id: {call_id!r} answers no pending call of "
                f"messages[{self.calls_at}].tool_calls (pending: "
                f"{', '.join(map(repr, self.pending)) or 'none'})")
        del self.pending[call_id]

    def check_answered(self, last: int) -> None:
        if self.pending:
            raise ChatTemplateError(
                f"messages[{last}].role: the tool calls {', '.join(map(repr, self.pending))} "
                f"of messages[{self.calls_at}] have no 'tool' result")


def _calls(message: dict) -> list:
    """An assistant message's tool calls ([] when it has none)."""
    return message.get("tool_calls") or []


def _validate_shape(i: int, message) -> None:
    if not isinstance(message, dict):
        raise ChatTemplateError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
    if "role" not in message:
        raise ChatTemplateError(f"messages[{i}].role: missing")
    if message["role"] not in ROLES:
        raise ChatTemplateError(f"messages[{i}].role: unknown role {message['role']!r}; "
                                "expected 'system' (or 'developer'), 'user', 'assistant' or "
                                "'tool'")
    if message["role"] == "assistant" and "tool_calls" in message:
        _validate_tool_calls(i, message)
    if message["role"] == "assistant" and _calls(message):
        return
    if "content" not in message:
        raise ChatTemplateError(f"messages[{i}].content: missing")
    _check_text(f"messages[{i}].content", message["content"])
    if message["role"] == "assistant" and not message["content"]:
        raise ChatTemplateError(f"messages[{i}].content: an assistant message must not "
                                "be empty (unless it has tool_calls)")
    if message["role"] == "tool":
        _check_text(f"messages[{i}].tool_call_id", message.get("tool_call_id"), nonempty=True)
        json_value(message["content"], f"messages[{i}].content")


def _check_text(field: str, value, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise ChatTemplateError(f"{field}: expected str, got {type(value).__name__}")
    if nonempty and not value:
        raise ChatTemplateError(f"{field}: must not be empty")
    if (at := lone_surrogate_at(value)) is not None:
        raise ChatTemplateError(surrogate_message(field, value, at))


def _validate_tool_calls(i: int, message: dict) -> None:
    """Rule 5: OpenAI's [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    calls = message["tool_calls"]
    if calls is None:
        return
    if not isinstance(calls, list):
        raise ChatTemplateError(f"messages[{i}].tool_calls: expected a list, got "
                                f"{type(calls).__name__}")
    content = message.get("content")
    if calls and content not in (None, ""):
        raise ChatTemplateError(f"messages[{i}].content: an assistant message with tool_calls "
                                "must have no content (null or \"\"): Mistral's format holds one "
                                "or the other")
    seen = set()
    for j, call in enumerate(calls):
        field = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise ChatTemplateError(f"{field}: expected {{'id', 'type': 'function', 'function': "
                                    "{'name', 'arguments'}}")
        if call.get("type", "function") != "function":
            raise ChatTemplateError(f"{field}.type: expected 'function', got {call['type']!r}")
        _check_text(f"{field}.id", call.get("id"), nonempty=True)
        if call["id"] in seen:
            raise ChatTemplateError(f"{field}.id: {call['id']!r} is already an earlier call's id")
        seen.add(call["id"])
        check_function_name(f"{field}.function.name", call["function"].get("name"))
        _check_text(f"{field}.function.arguments", call["function"].get("arguments"))
        json_value(call["function"]["arguments"], f"{field}.function.arguments")


def json_value(text: str, field: str = "messages"):
    """A tool result's content or a call's arguments as mistral-common encodes them: the value
    of JSON text, {} for "", other text as the string itself; ChatTemplateError naming `field`
    for JSON nested more than MAX_JSON_DEPTH levels."""
    if not text:
        return {}
    try:
        return parse_json(text, field)
    except JsonTooDeep as e:
        raise ChatTemplateError(str(e)) from None
    except InvalidRequest:
        return text


def check_function_name(field: str, name, error: type[InvalidRequest] = ChatTemplateError) -> None:
    """A function name as mistral-common allows it: 1-64 of a-z, A-Z, 0-9, '_' and '-'."""
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise error(f"{field}: {name!r} is not a function name: 1 to 64 characters "
                             "of a-z, A-Z, 0-9, '_' and '-'")
