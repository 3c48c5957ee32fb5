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
names, `messages[i].role` or `messages[i].content`):
1. `messages` is a non-empty list of dicts, each with a `role` of "system", "user" or
   "assistant" and a `content` that is a string holding no lone surrogate. "developer" is
   OpenAI's newer name for "system" and is that role here (the template sees "system"; errors
   name the role as sent).
2. Only the first message may be a system message. An empty system message means no system
   prompt; any other is prepended to the first user message, followed by a blank line.
3. After the optional system message, roles alternate user, assistant, user, ..., starting
   with user, and the last message is from the user.
4. An assistant message's content is not empty (whitespace alone is allowed); user content may
   be empty.
mistral-common also rejects what rules 3 (last message) and 4 reject. Stricter than it (it
accepts these): a system message after the first, consecutive user or consecutive assistant
messages (it joins them with a blank line), an assistant first (it inserts an empty user
message), and a conversation of a system message alone.
"""
from __future__ import annotations

import enum
import re
import secrets

from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.errors import InvalidRequest, lone_surrogate_at, surrogate_message

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

ROLES = ("system", "developer", "user", "assistant")
SYSTEM_ROLES = ("system", "developer")          # OpenAI's "developer" is "system" here


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
    """Rules 1-4 of the module docstring, checked message by message in order."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages: expected a non-empty list of {'role', 'content'} dicts")
    first_turn = 1 if isinstance(messages[0], dict) and messages[0].get("role") in SYSTEM_ROLES \
        else 0
    for i, message in enumerate(messages):
        _validate_shape(i, message)
        _validate_role(i, message["role"], first_turn)
        if message["role"] == "assistant" and not message["content"]:
            raise ChatTemplateError(f"messages[{i}].content: an assistant message must not "
                                    "be empty")
    if messages[-1]["role"] != "user":
        raise ChatTemplateError(f"messages[{len(messages) - 1}].role: the last message must be "
                                f"from 'user', got {messages[-1]['role']!r}")


def _validate_shape(i: int, message) -> None:
    if not isinstance(message, dict):
        raise ChatTemplateError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
    if "role" not in message:
        raise ChatTemplateError(f"messages[{i}].role: missing")
    if message["role"] not in ROLES:
        raise ChatTemplateError(f"messages[{i}].role: unknown role {message['role']!r}; "
                                "expected 'system' (or 'developer'), 'user' or 'assistant'")
    if "content" not in message:
        raise ChatTemplateError(f"messages[{i}].content: missing")
    if not isinstance(message["content"], str):
        raise ChatTemplateError(
            f"messages[{i}].content: expected str, got {type(message['content']).__name__}")
    if (at := lone_surrogate_at(message["content"])) is not None:
        raise ChatTemplateError(surrogate_message(f"messages[{i}].content", message["content"], at))


def _validate_role(i: int, role: str, first_turn: int) -> None:
    """Rules 2-3 for the role of message i; `first_turn` is 1 after a leading system message."""
    if role in SYSTEM_ROLES:
        if i > 0:
            raise ChatTemplateError(
                f"messages[{i}].role: a {role} message may only be the first message")
        return
    expected = "user" if (i - first_turn) % 2 == 0 else "assistant"
    if role != expected:
        raise ChatTemplateError(
            f"messages[{i}].role: expected {expected!r}, got {role!r}; after an optional "
            "leading system message, roles alternate user/assistant starting with user")
