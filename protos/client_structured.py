"""The command-line client's structured-output and tool flags (protos/client.py): what they add
to a GenerateRequest.

    --json-schema '{"type": "object", ...}'  or  --json-schema @schema.json
    --regex '[0-9]{3}'     --choice yes --choice no     --grammar @grammar.lark    --json-object
    --tool @weather.json --tool '{"type": "function", ...}' --tool-choice required
    --no-parallel-tool-calls

At most one of --json-schema, --regex, --choice, --grammar and --json-object (they fill the
request's `constraint` oneof). A value starting with "@" is read from that UTF-8 file (the
grammar and tool definitions are long); "@@" starts a value that is text beginning with "@"
(`--regex "@@[a-z]+"` is the regex `@[a-z]+`). The server checks every value (a schema that does not
compile is INVALID_ARGUMENT naming its field); the client checks only that files can be read
and --tool values are JSON objects: each failure is a usage error naming the flag. --tool
implies --chat (tools go with chat messages).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from protos import generator_pb2 as pb

TEXT_CONSTRAINTS = ("json_schema", "regex", "grammar")   # flags whose text is the field's value
AT_FILE = 'text, @FILE to read a UTF-8 file, or "@@..." for text that begins with "@"'


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags, on `ap` (the constraint flags mutually exclusive)."""
    one = ap.add_argument_group("structured output (at most one)").add_mutually_exclusive_group()
    one.add_argument("--json-schema", type=text_or_file, default=None, metavar="SCHEMA",
                     help="the text is JSON valid against this JSON Schema ("
                          f"{AT_FILE})")
    one.add_argument("--regex", type=text_or_file, default=None, metavar="REGEX",
                     help="the whole text matches this regular expression ("
                          f"{AT_FILE})")
    one.add_argument("--choice", action="append", default=None, metavar="TEXT",
                     help="the text is exactly one of these strings (repeatable)")
    one.add_argument("--grammar", type=text_or_file, default=None, metavar="GRAMMAR",
                     help="the text follows this Lark grammar (llguidance's dialect; "
                          f"{AT_FILE})")
    one.add_argument("--json-object", action="store_true", help="the text is a JSON object")
    tools = ap.add_argument_group("tool calling (implies --chat)")
    tools.add_argument("--tool", type=tool, action="append", default=None, metavar="JSON",
                       help='a tool, OpenAI\'s {"type": "function", "function": {"name", '
                            '"description", "parameters"}} as JSON (repeatable; '
                            f'{AT_FILE})')
    tools.add_argument("--tool-choice", default=None, metavar="CHOICE",
                       help="none, auto, required or a tool's name (the server's default: "
                            "auto with tools)")
    tools.add_argument("--parallel-tool-calls", action=argparse.BooleanOptionalAction,
                       default=None, help="allow several calls in one answer (the server's "
                                          "default: allowed)")


def text_or_file(value: str) -> str:
    """An argparse type: `value`, or the text of the UTF-8 file it names after "@"; "@@..." is
    the text "@..." (the escape of a leading "@")."""
    if not value.startswith("@") or value.startswith("@@"):
        return value[1:] if value.startswith("@@") else value
    try:
        return Path(value[1:]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {value[1:]!r}: {e}") from None


def tool(value: str) -> str:
    """An argparse type: a tool as JSON text of an object (given, or read from an @file)."""
    text = text_or_file(value)
    try:
        parsed = json.loads(text)
    except RecursionError:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is JSON nested too deeply") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not JSON text: {e}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(
            f"{value[:40]!r} is not a JSON object (OpenAI's tool: "
            '{"type": "function", "function": {...}})')
    return text


def apply(req: pb.GenerateRequest, args: argparse.Namespace) -> None:
    """Set `req`'s constraint and tool fields from the parsed flags."""
    for field in TEXT_CONSTRAINTS:
        if getattr(args, field) is not None:
            setattr(req, field, getattr(args, field))
    if args.choice is not None:
        req.choice.values.extend(args.choice)
    if args.json_object:
        req.json_object = True
    req.tools.extend(args.tool or [])
    if args.tool_choice is not None:
        req.tool_choice = args.tool_choice
    if args.parallel_tool_calls is not None:
        req.parallel_tool_calls = args.parallel_tool_calls
