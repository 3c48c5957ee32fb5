"""The OpenAI-compatible HTTP API's requests: their models and their translation to engine
inputs, through the same checks as gRPC (actors/serving/validation.py: `sampling_params_of`,
the one place both APIs validate). Pure; the HTTP app (actors/serving/http_app.py) serves it on
the gateway, and the response bodies are actors/serving/openai_responses.py's.

Follows OpenAI's API reference for /v1/completions and /v1/chat/completions (and vLLM's
extensions `top_k`, `ignore_eos`, `return_token_ids`, `repetition_penalty`, `min_tokens`,
`stop_token_ids`, `prompt_logprobs`): https://platform.openai.com/docs/api-reference
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
- Refused: `suffix`, `best_of` > 1, `tools` (and a `tool_choice` other than "none") and
  non-text `response_format`; `parallel_tool_calls` is accepted (with no tools, no calls).
- Unknown fields are refused (HTTP 400 naming them), as OpenAI's server does; types are strict
  (no `true` for 1, no "0.5" for 0.5). `null` for an optional field (and for an OpenAI field
  this server does not implement: NULL_ONLY) is its default, as OpenAI's server reads it.
- A string anywhere in the body holding a lone surrogate (JSON `"a\\ud800b"`) is refused
  before anything else, naming where it is (`messages[1].content: holds a lone surrogate`);
  no message ever quotes it.
- Chat messages as the `openai` SDK replays them (`message.model_dump()`): null or empty
  `refusal`, `tool_calls`, `function_call`, `audio` and any `annotations` are accepted and
  ignored; text parts are joined with "\\n", as vLLM and llama.cpp join them.
- `max_tokens` defaults to 16 for completions (as OpenAI) and to the rest of the context for
  chat; vLLM's `top_k: -1` means no cut.
- Errors are OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from actors.info import EngineInfo
from actors.serving.validation import prompt_ids_of, sampling_params_of
from model.engine import SamplingParams
from model.errors import InvalidRequest, lone_surrogate_at, surrogate_message
from model.sampling import MAX_TOP_LOGPROBS
from model.tokenizer import Tokenizer

# what a union-typed field accepts, for its 400 message
FIELD_FORMS = {"prompt": "a string, a list of token ids, or a list holding one of those",
               "stop": "a string or a list of strings",
               "messages": "a list of {role, content} messages, content a string or text parts"}


# OpenAI request fields this server does not implement, accepted as null (their default):
# the `openai` SDK's nullable create() parameters (openai/types/chat/completion_create_params.py)
NULL_ONLY = frozenset({"audio", "modalities", "prediction", "reasoning_effort", "service_tier",
                       "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
                       "verbosity", "web_search_options", "moderation", "functions",
                       "function_call"})
SURROGATE = "lone_surrogate"            # the pydantic error type of a string holding one


class _Body(BaseModel):
    """A JSON object of a request: strict (no lax coercion: true -> 1, "0.5" -> 0.5, ["1"] ->
    [1]; ints still pass as floats), unknown fields refused, null for an optional field its
    default."""
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        if not isinstance(data, dict):
            return data
        optional = {name for name, f in cls.model_fields.items() if not f.is_required()}
        return {k: v for k, v in data.items()
                if v is not None or (k not in optional and k not in NULL_ONLY)}


def _find_surrogate(body) -> tuple[str, str] | None:
    """(field, refusal) of the first string (a value or a key) of a JSON value that holds a
    lone surrogate, the field its path (`messages[1].content`; `logit_bias` for a key; `body`
    for the body's own keys); else None.
    Iterative: a body as deep as the JSON parser allows is no recursion error here."""
    stack = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if (at := lone_surrogate_at(value)) is not None:
                return path or "body", surrogate_message(path or "body", value, at)
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and (at := lone_surrogate_at(key)) is not None:
                    return path or "body", surrogate_message(f"{path or 'body'} (a key)",
                                                             key, at)
            stack += reversed([(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()
                               if isinstance(v, (str, dict, list))])
        elif isinstance(value, list):
            stack += reversed([(v, f"{path}[{i}]") for i, v in enumerate(value)
                               if isinstance(v, (str, dict, list))])
    return None


class _Request(_Body):
    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        """Before anything else reads (or quotes) a string: the tokenizer cannot take one, nor
        can a response echo one (no UTF-8 spells it)."""
        if (found := _find_surrogate(data)) is not None:
            field, message = found
            # the context replaces "{key}"s in order, without escapes: the message goes last
            raise PydanticCustomError(SURROGATE, "{message}", {"field": field, "message": message})
        return data

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


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[ChatContentPart]
    name: str | None = None
    # what an SDK's assistant message carries back (`message.model_dump()`): accepted null or
    # empty and ignored (chat_inputs refuses the rest by name; annotations: any, ignored)
    refusal: str | None = None
    tool_calls: list | None = None
    function_call: dict | None = None
    audio: dict | None = None
    annotations: list | None = None

    def text(self) -> str:
        """The content; text parts joined with "\\n", as vLLM and llama.cpp join them."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    echo: bool = False                           # false only: completions echo a prompt
    store: bool | None = None                    # false only: nothing is stored here
    metadata: dict[str, str] | None = None       # accepted (it goes with `store`)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None        # "none" (or unset) only: no tools here
    parallel_tool_calls: bool | None = None      # accepted; without tools there are none


_Request.model_rebuild()
REQUEST_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)


def _refuse(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(f"{field}: {message}")


def _check_common(r: _Request) -> None:
    _refuse(r.stream_options is None or r.stream, "stream_options", "needs stream: true")
    _check_top("prompt_logprobs", r.prompt_logprobs)


def _check_top(field: str, k: int | None) -> None:
    """A count of alternatives per token (completions' `logprobs`, `prompt_logprobs`)."""
    _refuse(k is None or 0 <= k <= MAX_TOP_LOGPROBS, field,
            f"must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {k}")


_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")


def logit_bias_of(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's `logit_bias` ({"50256": -100}: token ids as strings) as {token id: bias};
    InvalidRequest naming logit_bias for a key that is not an integer. The ids' range and the
    biases' are checked with the other sampling options (validation.sampling_params_of)."""
    out = {}
    for key, value in (bias or {}).items():
        _refuse(_TOKEN_ID.fullmatch(key) is not None, "logit_bias",
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
            top_logprobs: int, prompt_logprobs: int | None) -> SamplingParams:
    stop = [r.stop] if isinstance(r.stop, str) else (r.stop or [])
    top_k = 0 if r.top_k == -1 else r.top_k                  # vLLM's -1: no top-k cut
    return sampling_params_of(
        prompt_len, info.context_length, max_tokens=max_tokens, temperature=r.temperature,
        top_p=r.top_p, top_k=top_k, seed=r.seed, stop=stop, ignore_eos=r.ignore_eos,
        max_tokens_field=field, n=r.n, top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs, presence_penalty=r.presence_penalty,
        frequency_penalty=r.frequency_penalty, repetition_penalty=r.repetition_penalty,
        logit_bias=logit_bias_of(r.logit_bias), min_tokens=r.min_tokens,
        stop_token_ids=r.stop_token_ids or (), vocab_size=info.vocab_size)


def engine_prompt_logprobs(r: CompletionRequest) -> int | None:
    """The `prompt_logprobs` a completions request asks of the engine: its own, or with `echo`
    and `logprobs: k` the larger of the two; 0 for `echo` with `max_tokens: 0` and neither (the
    prompt is scored, nothing generated)."""
    asked = [k for k in (r.prompt_logprobs, r.logprobs if r.echo else None) if k is not None]
    if asked:
        return max(asked)
    return 0 if r.echo and r.max_tokens == 0 else None


def completion_inputs(r: CompletionRequest, tokenizer: Tokenizer,
                      info: EngineInfo) -> tuple[list[int], SamplingParams]:
    """(prompt ids, sampling params) of a /v1/completions request; InvalidRequest names the
    field."""
    _check_common(r)
    _refuse(r.suffix is None, "suffix", "is not supported")
    _refuse(r.best_of in (None, 1), "best_of", f"only 1 is supported, got {r.best_of}")
    _check_top("logprobs", r.logprobs)
    prompt = r.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        _refuse(len(prompt) == 1, "prompt", f"one prompt per request, got {len(prompt)}")
        prompt = prompt[0]
    _refuse(len(prompt) > 0, "prompt", "must not be empty")
    ids = prompt_ids_of(tokenizer, info.context_length, prompt=prompt, vocab_size=info.vocab_size)
    room = info.context_length - len(ids)
    max_tokens = min(16, room) if r.max_tokens is None else r.max_tokens   # OpenAI's default
    return ids, _params(r, info, len(ids), max_tokens=max_tokens, field="max_tokens",
                        top_logprobs=r.logprobs or 0, prompt_logprobs=engine_prompt_logprobs(r))


def chat_inputs(r: ChatCompletionRequest, tokenizer: Tokenizer,
                info: EngineInfo) -> tuple[list[int], SamplingParams]:
    """(prompt ids, sampling params) of a /v1/chat/completions request."""
    _check_common(r)
    _refuse(not r.echo, "echo", "is not supported by chat completions (echo a prompt with "
            "/v1/completions)")
    _refuse(r.top_logprobs is None or r.logprobs, "top_logprobs", "needs logprobs: true")
    _refuse(not r.tools, "tools", "are not supported")
    _refuse(not r.store, "store", "is not supported (this server stores nothing)")
    _refuse(r.tool_choice in (None, "none"), "tool_choice",
            f"only \"none\" is supported (this server has no tools), got {r.tool_choice!r}")
    _refuse(r.response_format in (None, {"type": "text"}), "response_format",
            "only {\"type\": \"text\"} is supported")
    _refuse(r.max_tokens is None or r.max_completion_tokens is None, "max_completion_tokens",
            "set it or max_tokens, not both")
    for i, m in enumerate(r.messages):
        for field in ("tool_calls", "function_call", "audio", "refusal"):
            _refuse(not getattr(m, field), f"messages[{i}].{field}",
                    "only null or empty is accepted (this server has no tools, audio or "
                    "refusals)")
    # OpenAI's "developer" role is "system" to the chat template (model/chat.py)
    messages = [{"role": m.role, "content": m.text()} for m in r.messages]
    ids = prompt_ids_of(tokenizer, info.context_length, messages=messages)
    field = "max_tokens" if r.max_tokens is not None else "max_completion_tokens"
    max_tokens = r.max_tokens if r.max_tokens is not None else r.max_completion_tokens
    if max_tokens is None:
        max_tokens = info.context_length - len(ids)              # chat: up to the context
    return ids, _params(r, info, len(ids), max_tokens=max_tokens, field=field,
                        top_logprobs=(r.top_logprobs or 0) if r.logprobs else 0,
                        prompt_logprobs=r.prompt_logprobs)
