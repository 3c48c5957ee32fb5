"""Tool calling on the model side: OpenAI's `tools` / `tool_choice` in, prompts, grammars and
parsed calls out. One `ToolCalling` per tokenizer; the gateway (HTTP and gRPC alike) uses it.

Contract:
- `tools_of(value)` / `tool_choice_of(value, tools)` read OpenAI's shapes; every refusal is an
  InvalidRequest naming the exact field ("tools[2].function.name: ...").
- `ToolCalling(tokenizer).native` is True on a vocabulary with Mistral's tool tokens (v3 and
  later). Then `prompt_ids` is mistral-common's v3 `encode_chat_completion` with the tools,
  exactly (model/chat_tools.py), and the model answers a call as [TOOL_CALLS] + the call list.
  On v1 (no tool tokens) the tools are described in the last user message when a call is
  forced (`required` or a named function) and `auto` is refused: nothing in v1's format marks
  a call, so free text and a call could not be told apart (docs/api.md, "Tool calling").
  With `none` the prompt carries no tools and the output is plain text.
- `constraint(tools, choice, parallel)` forces the call list with a grammar for `required` and
  a named function; None for `auto` and `none`.
- The call list is Mistral's: `[{"name": "f", "arguments": {...}}, ...]` in json.dumps's layout;
  `ToolCallParser` (model/tool_parser.py) reads it back, as it streams, into OpenAI tool calls
  with ids made here: 9 alphanumeric characters (mistral-common's v3 rule).
"""
from __future__ import annotations

import dataclasses
import json

from model.chat import check_function_name, validate_messages
from model.chat_tools import encode_v3, plain_messages
from model.constraint import Constraint
from model.errors import InvalidRequest, check_json_depth
from model.tool_parser import (
    TOOL_CALLS,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    finish_reason_of,
)

__all__ = ["Tool", "ToolChoice", "ToolCall", "ToolCallDelta", "ToolCallParser", "ToolCalling",
           "TOOL_CALLS", "finish_reason_of",
           "tools_of", "tool_choice_of", "MAX_TOOLS", "CHOICE_MODES"]

MAX_TOOLS = 128                 # tools in one request (OpenAI's limit too)
CHOICE_MODES = ("none", "auto", "required")
# The JSON layout the grammars force (json.dumps's default; llguidance's options).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
V1_TOOLS_PROMPT = ("You can call these tools (the parameters are a JSON Schema of each "
                   "function's arguments):\n{tools}\n{instruction} Answer with a JSON list of "
                   "the calls to make, each {{\"name\": <function name>, \"arguments\": "
                   "<arguments object>}}.\n\n")


@dataclasses.dataclass(frozen=True)
class Tool:
    """One function the model may call; `parameters` is a JSON Schema of its arguments."""
    name: str
    description: str = ""
    parameters: dict = dataclasses.field(default_factory=dict, hash=False)   # hash: the name

    def openai(self) -> dict:
        """OpenAI's (and mistral-common's) tool dict, keys in mistral-common's order."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    """mode "none" | "auto" | "required" | "function" (then `name` is the function's)."""
    mode: str
    name: str | None = None


def tools_of(value, field: str = "tools") -> tuple[Tool, ...]:
    """OpenAI's `[{"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}]` (None: no tools) -> Tools; InvalidRequest naming e.g. tools[2].function.name.
    `strict` is accepted and changes nothing: a forced call always follows the schema."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(f"{field}: expected a list of tools, got {type(value).__name__}")
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(f"{field}: {len(value)} tools; the limit is {MAX_TOOLS}")
    tools: list[Tool] = []
    for i, item in enumerate(value):
        tool = _tool_of(item, f"{field}[{i}]")
        if any(t.name == tool.name for t in tools):
            raise InvalidRequest(f"{field}[{i}].function.name: {tool.name!r} is already the name "
                                 "of an earlier tool")
        tools.append(tool)
    return tuple(tools)


def _tool_of(item, field: str) -> Tool:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{field}: expected {{'type': 'function', 'function': {{...}}}}, "
                             f"got {type(item).__name__}")
    if item.get("type") != "function":
        raise InvalidRequest(f"{field}.type: only 'function' tools are served, got "
                             f"{item.get('type')!r}")
    function = item.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(f"{field}.function: expected an object with 'name', got "
                             f"{type(function).__name__}")
    parameters = function.get("parameters")
    check_json_depth(parameters, f"{field}.function.parameters")
    check_json_depth(item, field)           # before json.dumps recurses into it
    check_function_name(f"{field}.function.name", function.get("name"), InvalidRequest)
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequest(f"{field}.function.description: expected str, got "
                             f"{type(description).__name__}")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequest(f"{field}.function.parameters: expected a JSON Schema object, got "
                             f"{type(parameters).__name__}")
    if parameters and parameters.get("type", "object") != "object":
        raise InvalidRequest(f"{field}.function.parameters.type: the arguments are an object; "
                             f"got {parameters['type']!r}")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequest(f"{field}.function.strict: expected a boolean, got "
                             f"{type(strict).__name__}")
    return Tool(function["name"], description or "", parameters or {})


def tool_choice_of(value, tools, field: str = "tool_choice") -> ToolChoice:
    """"none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}; None is
    "auto" when there are tools, else "none". InvalidRequest naming `field` for another value,
    a function not in `tools`, or a choice other than "none" without tools."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in CHOICE_MODES:
            raise InvalidRequest(f"{field}: expected 'none', 'auto', 'required' or "
                                 f"{{'type': 'function', 'function': {{'name': ...}}}}, got "
                                 f"{value[:100]!r}" + ("..." if len(value) > 100 else ""))
        choice = ToolChoice(value)
    else:
        choice = ToolChoice("function", _named_function(value, field))
        if choice.name not in {t.name for t in tools}:
            raise InvalidRequest(f"{field}.function.name: {choice.name[:100]!r} is not one of "
                                 "the request's tools")
    if choice.mode != "none" and not tools:
        raise InvalidRequest(f"{field}: {choice.name or choice.mode!r} needs tools; the request "
                             "has none")
    return choice


def _named_function(value, field: str) -> str:
    if (not isinstance(value, dict) or value.get("type") != "function"
            or not isinstance(value.get("function"), dict)):
        raise InvalidRequest(f"{field}: expected 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
    name = value["function"].get("name")
    if not isinstance(name, str):
        raise InvalidRequest(f"{field}.function.name: expected str, got {type(name).__name__}")
    return name


class ToolCalling:
    """How one tokenizer's vocabulary does tools; see the module docstring."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.native = tokenizer.native_tools
        self.tool_calls_id = tokenizer.control_id("[TOOL_CALLS]") if self.native else None

    def prompt_ids(self, messages: list[dict], tools: tuple[Tool, ...],
                   choice: ToolChoice) -> list[int]:
        """The chat prompt's ids with `tools` (see the module docstring); ChatTemplateError for
        messages that break model/chat.py's rules, InvalidRequest("tool_choice: ...") for
        `auto` with tools on v1."""
        offered = tools if choice.mode != "none" else ()
        if self.native:
            return encode_v3(self.tokenizer, messages, [t.openai() for t in offered])
        if offered and choice.mode == "auto":
            raise InvalidRequest(
                "tool_choice: 'auto' needs a vocabulary with tool tokens ([TOOL_CALLS], "
                "Mistral's v3 and later); this model's (v1) has none, so a call could not be "
                "told from text. Use 'required' or a named function (forced by a grammar), or "
                "'none'")
        validate_messages(messages)
        plain = plain_messages(messages)
        if offered:
            last = plain[-1]
            plain[-1] = {**last, "content": _describe(offered, choice) + last["content"]}
        return self.tokenizer.apply_chat_template(plain)

    def constraint(self, tools: tuple[Tool, ...], choice: ToolChoice,
                   parallel: bool) -> Constraint | None:
        """For "required" (one call, or one or more when `parallel`) and a named function
        (calls of it only): a Lark grammar of an optional space and the call list (after
        <[TOOL_CALLS]> when native), field "tool_choice". None for "auto" and "none". Each
        tool's parameters are their own `%json` root, so their "#/$defs/..." refs hold."""
        callable_ = [t for _, t in _forced(tools, choice)]
        if not callable_:
            return None
        rules = [f"call_{k}: {_call_head(t.name)} args_{k} \"}}\"\n"
                 f"args_{k}: %json {_arguments_schema(t)}" for k, t in enumerate(callable_)]
        more = ' ("," " " call)*' if parallel else ""
        # Mixtral's natural first token of the list is "▁[": the grammar allows the space
        head = (f'<[{self.tool_calls_id}]> ' if self.native else "") + '" "? '
        lark = "\n".join([f'start: {head}"[" call{more} "]"',
                          "call: " + " | ".join(f"call_{k}" for k in range(len(callable_))),
                          *rules])
        return Constraint("grammar", lark, "tool_choice")

    @staticmethod
    def parameter_constraints(tools: tuple[Tool, ...], choice: ToolChoice) -> list[Constraint]:
        """Each tool a forced call may call, its arguments' schema as its own constraint, field
        `tools[i].function.parameters` (i: its place in the request): what the gateway
        compiles to say which tool's schema broke the call-list grammar, and why."""
        return [Constraint("json", _arguments_schema(t), f"tools[{i}].function.parameters")
                for i, t in _forced(tools, choice)]

    def parser(self, tools: tuple[Tool, ...], choice: ToolChoice) -> ToolCallParser | None:
        """A parser of one choice's completion; None when it is plain text ("none")."""
        if choice.mode == "none" or not tools:
            return None
        forced = choice.mode != "auto"
        return ToolCallParser({t.name for t in tools}, forced,
                              self.tool_calls_id if self.native else None)


def _forced(tools: tuple[Tool, ...], choice: ToolChoice) -> list[tuple[int, Tool]]:
    """(index, tool) of the tools a forced call may call: all for "required", the named one
    for "function", none for "auto" and "none"."""
    if choice.mode not in ("required", "function"):
        return []
    return [(i, t) for i, t in enumerate(tools)
            if choice.mode == "required" or t.name == choice.name]


def _call_head(name: str) -> str:
    """The Lark literal of a call's text up to its arguments: {"name": "f", "arguments": """
    return json.dumps(f'{{"name": "{name}", "arguments": ')


def _arguments_schema(tool: Tool) -> str:
    """The tool's parameters as their own JSON Schema root (so its "#/$defs/..." refs hold), an
    object, in json.dumps's layout."""
    schema = {"type": "object", **tool.parameters, "x-guidance": JSON_LAYOUT}
    return json.dumps(schema, ensure_ascii=False)


def _describe(tools: tuple[Tool, ...], choice: ToolChoice) -> str:
    """The v1 text put before the last user message when a call is forced."""
    instruction = (f'Call the function "{choice.name}".' if choice.mode == "function"
                   else "Call one or more of them.")
    listed = json.dumps([t.openai() for t in tools], ensure_ascii=False)
    return V1_TOOLS_PROMPT.format(tools=listed, instruction=instruction)
