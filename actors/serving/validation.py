"""A request's checks, for every protocol (gRPC: actors/serving/grpc_messages.py; the OpenAI
HTTP API: actors/serving/openai_api.py): the prompt or chat messages to token ids, and the
sampling options to SamplingParams, each refusal an InvalidRequest whose message names the field
and its limit ("max_tokens must be in [1, 98] (context length 100 minus the prompt's 2
tokens), got 99"); the structured-output constraint a request sets (`constraint_of`: at most
one) and what its tools make (`tools_inputs`: the prompt, the grammar forcing a call, a
parser per choice). Pure functions; no protobuf, no HTTP.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence

from model import admission
from model.constraint import Constraint
from model.engine import SamplingParams
from model.errors import InvalidRequest, check_json_depth
from model.tokenizer import ChatTemplateError, Tokenizer
from model.tools import Tool, ToolCalling, ToolCallParser, ToolChoice, tool_choice_of, tools_of

DEFAULT_MAX_TOKENS = 16


def prompt_ids_of(tokenizer: Tokenizer, context_length: int, *,
                  prompt: str | Sequence[int] | None = None, messages: list[dict] | None = None,
                  vocab_size: int | None = None) -> list[int]:
    """Token ids of a prompt (text, encoded with BOS; or token ids, checked against `vocab_size`)
    or of chat messages ({"role", "content"} dicts, through the chat template): exactly one."""
    if prompt and messages:
        raise InvalidRequest("set exactly one of prompt and messages, not both")
    if not prompt and not messages:
        raise InvalidRequest("set one of prompt (non-empty text) and messages")
    if prompt:
        ids = admission.prompt_ids(prompt, tokenizer, vocab_size or tokenizer.vocab_size,
                                   context_length)
    else:
        chars = sum(len(m["role"]) + len(m["content"]) for m in messages)
        admission.check_text_size("messages", chars, tokenizer, context_length)
        try:
            ids = tokenizer.apply_chat_template(messages)
        except ChatTemplateError as e:
            raise InvalidRequest(str(e)) from None
    return _fitting(ids, context_length)


def _fitting(ids: list[int], context_length: int) -> list[int]:
    if len(ids) >= context_length:
        raise InvalidRequest(f"prompt is {len(ids)} tokens; the context length is "
                             f"{context_length} (prompt + max_tokens must fit)")
    return ids


def constraint_of(*constraints: Constraint | None) -> Constraint | None:
    """The one constraint among those a request's fields set (None: unset); InvalidRequest
    naming both fields when two are set ("response_format and guided_regex: ...")."""
    given = [c for c in constraints if c is not None]
    if len(given) > 1:
        raise InvalidRequest(f"{given[0].field} and {given[1].field}: set one structured-output "
                             "constraint, not both (a forced tool call is one too)")
    return given[0] if given else None


@dataclasses.dataclass(frozen=True)
class ToolInputs:
    """What a chat request with tools (or tool messages) makes: its prompt's token ids, the
    grammar forcing a call (tool_choice "required" or a function; else None) and how its
    output is read (`parser()`: a new ToolCallParser per choice, or None: plain text)."""
    prompt_ids: list[int]
    constraint: Constraint | None
    calling: ToolCalling
    tools: tuple[Tool, ...]
    choice: ToolChoice

    def parser(self) -> ToolCallParser | None:
        return self.calling.parser(self.tools, self.choice)

    def parameter_constraints(self) -> list[Constraint]:
        """The forced tools' parameters schemas, each its own constraint naming
        `tools[i].function.parameters` (EngineClient.check compiles them when the call-list
        grammar does not compile, to name the tool and llguidance's reason)."""
        return self.calling.parameter_constraints(self.tools, self.choice)


@functools.lru_cache(maxsize=8)
def tool_calling(tokenizer: Tokenizer) -> ToolCalling:
    """The tokenizer's ToolCalling, made once."""
    return ToolCalling(tokenizer)


def tools_inputs(tokenizer: Tokenizer, context_length: int, messages: list[dict],
                 tools: list | None = None, tool_choice: str | dict | None = None,
                 parallel_tool_calls: bool | None = None) -> ToolInputs:
    """ToolInputs of chat `messages` (OpenAI's dicts: role "tool" with tool_call_id, assistant
    tool_calls) with OpenAI's `tools`, `tool_choice` (default "auto" with tools, else "none")
    and `parallel_tool_calls` (default true); InvalidRequest naming the field (`tools[2].
    function.name`, `tool_choice`, `messages[1].tool_calls`, `prompt`)."""
    defined = tools_of(tools or [], "tools")
    choice = tool_choice_of(tool_choice, defined, "tool_choice")
    check_json_depth(messages, "messages")      # before json.dumps recurses into them
    chars = len(json.dumps([messages, tools], ensure_ascii=False))
    admission.check_text_size("messages", chars, tokenizer, context_length)
    calling = tool_calling(tokenizer)
    try:
        ids = _fitting(calling.prompt_ids(messages, defined, choice), context_length)
    except ChatTemplateError as e:
        raise InvalidRequest(str(e)) from None
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    return ToolInputs(ids, calling.constraint(defined, choice, parallel), calling, defined,
                      choice)


def sampling_params_of(prompt_len: int, context_length: int, *, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       top_k: int | None = None, seed: int | None = None,
                       stop: Sequence[str] = (), ignore_eos: bool = False,
                       max_tokens_field: str = "max_tokens", n: int | None = None,
                       top_logprobs: int | None = None, prompt_logprobs: int | None = None,
                       presence_penalty: float | None = None,
                       frequency_penalty: float | None = None,
                       repetition_penalty: float | None = None,
                       logit_bias: Mapping[int, float] | None = None,
                       min_tokens: int | None = None, stop_token_ids: Sequence[int] = (),
                       vocab_size: int | None = None,
                       constraint: Constraint | None = None,
                       cache_salt: str | None = None) -> SamplingParams:
    """SamplingParams from a request's optional fields (None: the default); raises
    InvalidRequest naming the field and its limit. `max_tokens` 0 is allowed only with
    `prompt_logprobs` (a prompt scored, nothing generated: completions' `echo`).
    `vocab_size`: logit_bias keys and stop_token_ids must be below it; `constraint`: the
    structured output (constraint_of's; whether it compiles is EngineClient.check's);
    `cache_salt`: vLLM's, only requests with the same one share prefix-cached KV blocks."""
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    room = context_length - prompt_len
    low = 0 if prompt_logprobs is not None else 1
    is_int = isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
    if not is_int or not low <= max_tokens <= room:
        raise InvalidRequest(f"{max_tokens_field} must be in [{low}, {room}] (context length "
                             f"{context_length} minus the prompt's {prompt_len} tokens), got "
                             f"{max_tokens}" + ("; 0 only with prompt_logprobs (completions: "
                                                "echo), which scores the prompt alone"
                                                if max_tokens == 0 and low else ""))
    bias = dict(logit_bias or {})
    if vocab_size is not None:
        for field, ids in (("logit_bias", bias), ("stop_token_ids", stop_token_ids)):
            bad = [t for t in ids if isinstance(t, int) and not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequest(f"{field}: token ids must be in [0, {vocab_size}) (this "
                                     f"model's vocabulary), got {bad[:5]}")
    def given(value, default):
        return default if value is None else value
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=given(temperature, 1.0),
            top_p=given(top_p, 1.0), top_k=given(top_k, 0), seed=seed, stop=tuple(stop),
            ignore_eos=ignore_eos, n=given(n, 1), top_logprobs=given(top_logprobs, 0),
            prompt_logprobs=prompt_logprobs, presence_penalty=given(presence_penalty, 0.0),
            frequency_penalty=given(frequency_penalty, 0.0),
            repetition_penalty=given(repetition_penalty, 1.0), logit_bias=bias,
            min_tokens=given(min_tokens, 0), stop_token_ids=tuple(stop_token_ids),
            constraint=constraint, cache_salt=cache_salt)
    except ValueError as e:       # SamplingParams names the field and its limit
        raise InvalidRequest(str(e)) from None
