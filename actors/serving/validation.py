"""A request's checks, for every protocol (gRPC: actors/serving/grpc_messages.py; the OpenAI
HTTP API: actors/serving/openai_api.py): the prompt or chat messages to token ids, and the
sampling options to SamplingParams, each refusal an InvalidRequest whose message names the field
and its limit ("max_tokens must be in [1, 98] (context length 100 minus the prompt's 2
tokens), got 99"). Pure functions; no protobuf, no HTTP.
"""
from __future__ import annotations

from collections.abc import Sequence

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
                       max_tokens_field: str = "max_tokens") -> SamplingParams:
    """SamplingParams from a request's optional fields (None: the default); raises
    InvalidRequest naming the field and its limit."""
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    room = context_length - prompt_len
    is_int = isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
    if not is_int or not 0 < max_tokens <= room:
        raise InvalidRequest(f"{max_tokens_field} must be in [1, {room}] (context length "
                             f"{context_length} minus the prompt's {prompt_len} tokens), got "
                             f"{max_tokens}")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p, top_k=0 if top_k is None else top_k,
            seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)
    except ValueError as e:       # SamplingParams names the field and its limit
        raise InvalidRequest(str(e)) from None
