"""The OpenAI-compatible HTTP API's requests: their models and their translation to engine
inputs, through the same checks as gRPC (actors/serving/validation.py: `sampling_params_of`,
the one place both APIs validate). Pure; the HTTP app (actors/serving/http_app.py) serves it on
the gateway, and the response bodies are actors/serving/openai_responses.py's.

Follows OpenAI's API reference for /v1/completions and /v1/chat/completions (and vLLM's
extensions `top_k`, `ignore_eos`, `return_token_ids`, `repetition_penalty`, `min_tokens`,
`stop_token_ids`, `prompt_logprobs`, `cache_salt`): https://platform.openai.com/docs/api-reference
- `n` choices (1..16); `presence_penalty`, `frequency_penalty` ([-2, 2]); `logit_bias` (keys
  token ids as strings, as OpenAI's: a key that is not an integer is refused naming
  logit_bias; values in [-100, 100], at most 300).
- Logprobs: chat `logprobs: true` with `top_logprobs` 0..20 alternatives; completions
  `logprobs: k` (0..20). `echo: true` (completions only; chat refuses it) returns the prompt's
  text before the completion's and, with `logprobs`, the prompt tokens' entries first (the
  first one null); `max_tokens: 0` with `echo` scores the prompt and generates nothing (asked
  of the engine as `prompt_logprobs`). vLLM's `prompt_logprobs: k` (both endpoints) adds
  vLLM's `prompt_logprobs` field. With `echo` and `logprobs: k` the engine is asked for the
  larger of k and `prompt_logprobs`.
- Structured outputs (both endpoints): `response_format`, vLLM's `structured_outputs` and
  `guided_*` (actors/serving/openai_structured.py), at most one per request.
- Tools (chat): `tools`, `tool_choice`, `parallel_tool_calls`, and in `messages` tool results
  (`role: "tool"`, `tool_call_id`) and assistant `tool_calls` (their `content` may be null),
  through model/tools.py (validation.tools_inputs): the prompt with the tools, a grammar
  forcing a call for "required" or a named function, a parser per choice for the reply.
- Refused: `suffix`, `best_of` > 1.
- Unknown fields are refused (HTTP 400 naming them), as OpenAI's server does; types are strict
  (no `true` for 1, no "0.5" for 0.5). `null` for an optional field (and for an OpenAI field
  this server does not implement: NULL_ONLY) is its default, as OpenAI's server reads it.
- A string anywhere in the body holding a lone surrogate (JSON `"a\\ud800b"`) is refused
  before anything else, naming where it is (`messages[1].content: holds a lone surrogate`);
  no message ever quotes it.
- Chat messages as the `openai` SDK replays them (`message.model_dump()`): null or empty
  `refusal`, `function_call`, `audio` and any `annotations` are accepted and ignored (null or
  empty `tool_calls` too); text parts are joined with "\\n", as vLLM and llama.cpp join them.
- `max_tokens` defaults to 16 for completions (as OpenAI) and to the rest of the context for
  chat; vLLM's `top_k: -1` means no cut.
- Errors are OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import dataclasses
import re

from pydantic import Field

from actors.info import EngineInfo
from actors.serving.openai_body import NULL_ONLY, SURROGATE, Body, Request
from actors.serving.openai_messages import ChatMessage, message_dicts, refuse, uses_tools
from actors.serving.openai_structured import StructuredFields, request_constraints
from actors.serving.validation import (
    ToolInputs,
    constraint_of,
    prompt_ids_of,
    sampling_params_of,
    tools_inputs,
)
from model.engine import SamplingParams
from model.errors import InvalidRequest
from model.sampling import MAX_TOP_LOGPROBS
from model.tokenizer import Tokenizer

# what a union-typed field accepts, for its 400 message
FIELD_FORMS = {"prompt": "a string, a list of token ids, or a list holding one of those",
               "stop": "a string or a list of strings",
               "messages": "a list of {role, content} messages, content a string or text parts"}


__all__ = ["NULL_ONLY", "SURROGATE", "CompletionRequest", "ChatCompletionRequest", "Inputs",
           "completion_inputs", "chat_inputs", "completion_request", "chat_request"]


class _Request(Request, StructuredFields):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None               # vLLM's extension
    ignore_eos: bool = False               # vLLM's extension
    return_token_ids: bool = False         # vLLM's extension: choices carry `token_ids`
    repetition_penalty: float | None = None  # vLLM's extension (> 0; 1 = off)
    min_tokens: int = 0                    # vLLM's extension
    stop_token_ids: list[int] | None = None  # vLLM's extension
    prompt_logprobs: int | None = None     # vLLM's extension: the prompt tokens' logprobs
    cache_salt: str | None = None          # vLLM's extension: prefix-cache sharing group


class StreamOptions(Body):
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    echo: bool = False                           # false only: completions echo a prompt
    store: bool | None = None                    # false only: nothing is stored here
    metadata: dict[str, str] | None = None       # accepted (it goes with `store`)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


_Request.model_rebuild()
REQUEST_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)


def _check_common(r: _Request) -> None:
    refuse(r.stream_options is None or r.stream, "stream_options", "needs stream: true")
    _check_top("prompt_logprobs", r.prompt_logprobs)


def _check_top(field: str, k: int | None) -> None:
    """A count of alternatives per token (completions' `logprobs`, `prompt_logprobs`)."""
    refuse(k is None or 0 <= k <= MAX_TOP_LOGPROBS, field,
            f"must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {k}")


_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")


def logit_bias_of(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's `logit_bias` ({"50256": -100}: token ids as strings) as {token id: bias};
    InvalidRequest naming logit_bias for a key that is not an integer. The ids' range and the
    biases' are checked with the other sampling options (validation.sampling_params_of)."""
    out = {}
    for key, value in (bias or {}).items():
        refuse(_TOKEN_ID.fullmatch(key) is not None, "logit_bias",
                f"keys must be token ids (integers, as strings), got {key[:40]!r}")
        out[int(key)] = value
    return out


def check_model(model: str, served: str) -> None:
    """ModelNotFound unless `model` (a request's, or a path's) is the served model's name."""
    if model != served:
        raise ModelNotFound(f"model {model!r} is not served here; this server serves "
                            f"{served!r} (GET /v1/models)")


class ModelNotFound(InvalidRequest):
    """The request names another model: HTTP 404, as OpenAI's `model_not_found`."""


def _params(r: _Request, info: EngineInfo, prompt_len: int, *, max_tokens: int, field: str,
            top_logprobs: int, prompt_logprobs: int | None,
            tools: ToolInputs | None = None) -> SamplingParams:
    stop = [r.stop] if isinstance(r.stop, str) else (r.stop or [])
    top_k = 0 if r.top_k == -1 else r.top_k                  # vLLM's -1: no top-k cut
    forced = tools.constraint if tools is not None else None
    return sampling_params_of(
        prompt_len, info.context_length, max_tokens=max_tokens, temperature=r.temperature,
        top_p=r.top_p, top_k=top_k, seed=r.seed, stop=stop, ignore_eos=r.ignore_eos,
        max_tokens_field=field, n=r.n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, presence_penalty=r.presence_penalty,
        frequency_penalty=r.frequency_penalty, repetition_penalty=r.repetition_penalty,
        logit_bias=logit_bias_of(r.logit_bias), min_tokens=r.min_tokens,
        stop_token_ids=r.stop_token_ids or (), vocab_size=info.vocab_size,
        constraint=constraint_of(*request_constraints(r), forced), cache_salt=r.cache_salt)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A request's engine inputs: its prompt's token ids, its sampling params and (a chat with
    tools or tool messages) its ToolInputs, which read the reply's tool calls."""
    ids: list[int]
    params: SamplingParams
    tools: ToolInputs | None = None


def engine_prompt_logprobs(r: CompletionRequest) -> int | None:
    """The `prompt_logprobs` a completions request asks of the engine: its own, or with `echo`
    and `logprobs: k` the larger of the two; 0 for `echo` with `max_tokens: 0` and neither (the
    prompt is scored, nothing generated)."""
    asked = [k for k in (r.prompt_logprobs, r.logprobs if r.echo else None) if k is not None]
    if asked:
        return max(asked)
    return 0 if r.echo and r.max_tokens == 0 else None


def completion_request(r: CompletionRequest, tokenizer: Tokenizer, info: EngineInfo) -> Inputs:
    """The Inputs of a /v1/completions request; InvalidRequest names the field."""
    _check_common(r)
    refuse(r.suffix is None, "suffix", "is not supported")
    refuse(r.best_of in (None, 1), "best_of", f"only 1 is supported, got {r.best_of}")
    _check_top("logprobs", r.logprobs)
    prompt = r.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        refuse(len(prompt) == 1, "prompt", f"one prompt per request, got {len(prompt)}")
        prompt = prompt[0]
    refuse(len(prompt) > 0, "prompt", "must not be empty")
    ids = prompt_ids_of(tokenizer, info.context_length, prompt=prompt, vocab_size=info.vocab_size)
    room = info.context_length - len(ids)
    max_tokens = min(16, room) if r.max_tokens is None else r.max_tokens   # OpenAI's default
    return Inputs(ids, _params(r, info, len(ids), max_tokens=max_tokens, field="max_tokens",
                               top_logprobs=r.logprobs or 0,
                               prompt_logprobs=engine_prompt_logprobs(r)))


def completion_inputs(r: CompletionRequest, tokenizer: Tokenizer,
                      info: EngineInfo) -> tuple[list[int], SamplingParams]:
    """(prompt ids, sampling params) of a /v1/completions request."""
    inputs = completion_request(r, tokenizer, info)
    return inputs.ids, inputs.params


def chat_request(r: ChatCompletionRequest, tokenizer: Tokenizer, info: EngineInfo) -> Inputs:
    """The Inputs of a /v1/chat/completions request; InvalidRequest names the field."""
    _check_common(r)
    refuse(not r.echo, "echo", "is not supported by chat completions (echo a prompt with "
            "/v1/completions)")
    refuse(r.top_logprobs is None or r.logprobs, "top_logprobs", "needs logprobs: true")
    refuse(not r.store, "store", "is not supported (this server stores nothing)")
    refuse(r.max_tokens is None or r.max_completion_tokens is None, "max_completion_tokens",
            "set it or max_tokens, not both")
    # OpenAI's "developer" role is "system" to the chat template (model/chat.py)
    messages, tools = message_dicts(r.messages), None
    if uses_tools(r.tools, r.tool_choice, messages):
        tools = tools_inputs(tokenizer, info.context_length, messages, r.tools, r.tool_choice,
                             r.parallel_tool_calls)
        ids = tools.prompt_ids
    else:
        ids = prompt_ids_of(tokenizer, info.context_length, messages=messages)
    field = "max_tokens" if r.max_tokens is not None else "max_completion_tokens"
    max_tokens = r.max_tokens if r.max_tokens is not None else r.max_completion_tokens
    if max_tokens is None:
        max_tokens = info.context_length - len(ids)              # chat: up to the context
    return Inputs(ids, _params(r, info, len(ids), max_tokens=max_tokens, field=field,
                               top_logprobs=(r.top_logprobs or 0) if r.logprobs else 0,
                               prompt_logprobs=r.prompt_logprobs, tools=tools), tools)


def chat_inputs(r: ChatCompletionRequest, tokenizer: Tokenizer,
                info: EngineInfo) -> tuple[list[int], SamplingParams]:
    """(prompt ids, sampling params) of a /v1/chat/completions request."""
    inputs = chat_request(r, tokenizer, info)
    return inputs.ids, inputs.params
