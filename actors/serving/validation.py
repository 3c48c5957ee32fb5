"""A request's checks, for every protocol (gRPC: actors/serving/grpc_messages.py; the OpenAI
HTTP API: actors/serving/openai_api.py): the prompt or chat messages to token ids, and the
sampling options to SamplingParams, each refusal an InvalidRequest whose message names the field
and its limit ("max_tokens must be in [1, 98] (context length 100 minus the prompt's 2
tokens), got 99"). Pure functions; no protobuf, no HTTP.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from model import admission
from model.engine import SamplingParams
from model.errors import InvalidRequest
from model.tokenizer import ChatTemplateError, Tokenizer

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
    if len(ids) >= context_length:
        raise InvalidRequest(f"prompt is {len(ids)} tokens; the context length is "
                             f"{context_length} (prompt + max_tokens must fit)")
    return ids


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
                       vocab_size: int | None = None) -> SamplingParams:
    """SamplingParams from a request's optional fields (None: the default); raises
    InvalidRequest naming the field and its limit. `max_tokens` 0 is allowed only with
    `prompt_logprobs` (a prompt scored, nothing generated: completions' `echo`).
    `vocab_size`: logit_bias keys and stop_token_ids must be below it."""
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
            min_tokens=given(min_tokens, 0), stop_token_ids=tuple(stop_token_ids))
    except ValueError as e:       # SamplingParams names the field and its limit
        raise InvalidRequest(str(e)) from None
