"""What the command-line client (protos/client.py) prints of a Generate or GenerateStream reply.

One choice (n = 1), streamed: its text as it arrives, then
    [finish_reason=length prompt_tokens=5 completion_tokens=6 cached_tokens=0]
Several choices: each whole, by index, once all have finished, then the totals:
    [choice 0]
    <its text>
    [finish_reason=stop tokens=4]
    ...
    [prompt_tokens=5 completion_tokens=11 cached_tokens=0]
(cached_tokens: the prompt tokens the server's prefix cache held.)
After the text, each tool call (`tools`) whole, its streamed pieces joined:
    [tool_call 0 id=AbC123xyZ get_weather({"city": "Paris"})]
After a choice's line, with --logprobs (or --top-logprobs) `[logprobs id:logprob ...]`, and
with --top-logprobs a `[top_logprobs]` line then one line per token: `  id: alt'text':logprob
...` (most likely first). At the end, with --prompt-logprobs, `[prompt_logprobs id:logprob ...]`
(the first prompt token's logprob is `-`: nothing precedes it), then each prompt token's
alternatives, a line each.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
from collections.abc import Iterable

from protos import generator_pb2 as pb


@dataclasses.dataclass
class Choice:
    """One choice as received: its messages' fields joined."""
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[pb.TopLogprobs] = dataclasses.field(default_factory=list)  # per token
    finish_reason: str = ""
    tool_calls: dict[int, pb.ToolCall] = dataclasses.field(default_factory=dict)  # by index

    def add(self, part: pb.GenerateResponse | pb.Choice) -> None:
        """Join a message's fields (a GenerateResponse's and a Choice's share their names)."""
        self.text += part.text
        for call in part.tool_calls:
            self.tool_calls.setdefault(call.index, pb.ToolCall(index=call.index)).MergeFrom(
                pb.ToolCall(id=call.id, name=call.name))
            self.tool_calls[call.index].arguments += call.arguments
        self.token_ids += part.token_ids
        self.logprobs += part.logprobs
        self.top_logprobs += part.top_logprobs
        self.finish_reason = part.finish_reason or self.finish_reason


def write_replies(replies: Iterable[pb.GenerateResponse], live: bool, logprobs: bool) -> None:
    """Print a reply's messages (see the module docstring). `live`: one choice, its text
    written as it arrives; `logprobs`: print the chosen tokens' logprobs."""
    choices: dict[int, Choice] = collections.defaultdict(Choice)
    last, prompt_logprobs = None, []
    for last in replies:
        for part in last.choices or [last]:     # Generate with n > 1: every choice at once
            choices[part.index].add(part)
        prompt_logprobs = prompt_logprobs or list(last.prompt_logprobs)
        if live:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    if last is None:
        return
    usage = (f"prompt_tokens={last.usage.prompt_tokens} "
             f"completion_tokens={last.usage.completion_tokens} "
             f"cached_tokens={last.usage.cached_tokens}]\n")
    if live:
        sys.stdout.write("\n")
        write_tool_calls(choices[0])
        sys.stdout.write(f"[finish_reason={last.finish_reason} {usage}")
        write_logprobs(choices[0], logprobs)
    else:
        for index in sorted(choices):
            c = choices[index]
            sys.stdout.write(f"[choice {index}]\n{c.text}\n")
            write_tool_calls(c)
            sys.stdout.write(f"[finish_reason={c.finish_reason} tokens={len(c.token_ids)}]\n")
            write_logprobs(c, logprobs)
        sys.stdout.write(f"[{usage}")
    write_prompt_logprobs(prompt_logprobs)


def write_tool_calls(c: Choice) -> None:
    """A line per tool call of a choice, by index: `[tool_call i id=... name(arguments)]`."""
    for index in sorted(c.tool_calls):
        call = c.tool_calls[index]
        sys.stdout.write(f"[tool_call {index} id={call.id} {call.name}({call.arguments})]\n")


def write_logprobs(c: Choice, logprobs: bool) -> None:
    """A choice's logprobs line (if `logprobs`) and its alternatives' lines (if it has any)."""
    if logprobs:
        sys.stdout.write("[logprobs " + " ".join(
            f"{t}:{lp:.4f}" for t, lp in zip(c.token_ids, c.logprobs)) + "]\n")
    if c.top_logprobs:
        sys.stdout.write("[top_logprobs]\n")
    for token, top in zip(c.token_ids, c.top_logprobs):
        sys.stdout.write(f"  {token}: {alternatives(top.alternatives)}\n")


def write_prompt_logprobs(entries: list[pb.PromptLogprob]) -> None:
    """Each prompt token id with its logprob ("-" for the first), then its alternatives."""
    if not entries:
        return
    sys.stdout.write("[prompt_logprobs " + " ".join(
        f"{p.token_id}:{p.logprob:.4f}" if p.HasField("logprob") else f"{p.token_id}:-"
        for p in entries) + "]\n")
    for p in entries:
        if p.alternatives:
            sys.stdout.write(f"  {p.token_id}: {alternatives(p.alternatives)}\n")


def alternatives(tokens: Iterable[pb.TokenLogprob]) -> str:
    """`id'text':logprob` per token, as given (most likely first)."""
    return " ".join(f"{a.token_id}{a.token.decode(errors='replace')!r}:{a.logprob:.4f}"
                    for a in tokens)
