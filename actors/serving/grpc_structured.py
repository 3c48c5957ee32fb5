"""A GenerateRequest's structured-output and tool fields, read into what every protocol uses:
the `constraint` oneof as a model.constraint.Constraint, and `tools`, `tool_choice`,
`parallel_tool_calls` and the tool parts of `messages` through validation.tools_inputs (the
prompt with the tools, the grammar forcing a call, a parser per choice). The rules live in
model/ and actors/serving/validation.py (shared with the OpenAI HTTP API); this module only
reads the proto's shapes (JSON text for tools, a string for tool_choice). Each refusal is an
InvalidRequest naming the proto field ("json_schema: the JSON schema does not compile: ...",
"tools[1]: not JSON text: ...").
"""
from __future__ import annotations

from actors.serving.validation import ToolInputs, tools_inputs
from model.constraint import JSON_OBJECT, Constraint
from model.errors import InvalidRequest, parse_json
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb

# the `constraint` oneof's text fields -> their Constraint kind (choice and json_object: below)
CONSTRAINT_KINDS = {"json_schema": "json", "regex": "regex", "grammar": "grammar"}
TOOL_CHOICE_MODES = ("none", "auto", "required")


def constraint(req: pb.GenerateRequest) -> Constraint | None:
    """The request's `constraint` oneof as a Constraint whose `field` is the proto field set
    ("json_schema", "regex", "choice", "grammar", "json_object"); None when none is (or
    json_object is false). InvalidRequest naming the field (an empty text, a schema that is not
    JSON, ...); whether it compiles is checked later (EngineClient.check)."""
    which = req.WhichOneof("constraint")
    if which is None or (which == "json_object" and not req.json_object):
        return None
    if which == "json_object":
        return Constraint("json", JSON_OBJECT, which)
    if which == "choice":
        return Constraint.choice(list(req.choice.values), which)
    return Constraint(CONSTRAINT_KINDS[which], getattr(req, which), which)


def tool_fields(req: pb.GenerateRequest) -> list[str]:
    """The tool fields a request sets, and "messages" if a message is a tool result or
    carries tool calls."""
    given = [f for f in ("tools", "tool_choice") if getattr(req, f)]
    given += ["parallel_tool_calls"] if req.HasField("parallel_tool_calls") else []
    if any(m.role == "tool" or m.tool_call_id or m.tool_calls for m in req.messages):
        given.append("messages")
    return given


def message_dict(m: pb.ChatMessage) -> dict:
    """A ChatMessage as OpenAI's dict (model/tools.py reads that shape): content None for an
    assistant's empty content beside its tool_calls."""
    out = {"role": m.role, "content": None if m.tool_calls and not m.content else m.content}
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    return out


def tools_json(req: pb.GenerateRequest) -> list:
    """The `tools` entries parsed from their JSON text; InvalidRequest naming `tools[i]`."""
    return [parse_json(text, f"tools[{i}]", "not JSON text (an OpenAI tool object as JSON)")
            for i, text in enumerate(req.tools)]


def tool_choice_value(text: str) -> str | dict | None:
    """`tool_choice` as OpenAI's value: "" -> None (the default), a mode word as it is, JSON
    text of an object parsed, any other text the name of the function to call."""
    if not text or text in TOOL_CHOICE_MODES:
        return text or None
    if text.lstrip().startswith("{"):
        return parse_json(text, "tool_choice", "not JSON text")
    return {"type": "function", "function": {"name": text}}


def tool_inputs(req: pb.GenerateRequest, tokenizer: Tokenizer,
                context_length: int) -> ToolInputs | None:
    """The request's ToolInputs, None if it sets no tool field (then its prompt is read as
    before). Tools go with `messages` only: with `prompt` or `prompt_token_ids` they are
    refused, naming the tool field."""
    given = tool_fields(req)
    if not given:
        return None
    if not req.messages:
        prompt = "prompt" if req.prompt else "prompt_token_ids"
        raise InvalidRequest(f"{given[0]}: tools go with messages (a chat), not with {prompt}")
    return tools_inputs(tokenizer, context_length, [message_dict(m) for m in req.messages],
                        tools_json(req), tool_choice_value(req.tool_choice),
                        req.parallel_tool_calls if req.HasField("parallel_tool_calls") else None)
