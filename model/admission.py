"""Request validation, before anything is queued: every check that can reject a request, as
pure functions of the request and the engine's limits. Each raises InvalidRequest naming the
field and its limit (gRPC INVALID_ARGUMENT); none touches engine state, which is what lets a
call with several prompts be admitted whole or not at all.

    ids = prompt_ids("Hello", tokenizer, vocab_size=32000, max_model_len=4096)  # [1, 22557]
    check_request(ids, SamplingParams(max_tokens=20), max_model_len=4096, vocab_size=32000)
"""
from __future__ import annotations

from collections.abc import Sequence

from model.errors import InvalidRequest, check_unicode
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def is_prompt_list(prompts) -> bool:
    """A list of prompts (texts or id lists), as opposed to one prompt (a text or an id list)."""
    return (isinstance(prompts, (list, tuple)) and len(prompts) > 0
            and not isinstance(prompts[0], int))


def as_prompt_list(prompts) -> list[Prompt]:
    return list(prompts) if is_prompt_list(prompts) else [prompts]


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer, vocab_size: int,
               max_model_len: int) -> list[int]:
    """Token ids of a text (encoded with BOS) or of a list of ids (checked against the vocab)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        check_text_size("prompt", len(prompt), tokenizer, max_model_len)
        check_unicode("prompt", prompt)
        return tokenizer.encode(prompt)
    if not isinstance(prompt, Sequence):
        raise InvalidRequest("prompt must be text or a list of token ids, got "
                             f"{type(prompt).__name__}")
    ids = list(prompt)
    if not ids:
        raise InvalidRequest("prompt must not be empty")
    bad = [t for t in ids
           if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab_size}), "
                             f"got {bad[:5]}")
    return ids


def check_text_size(field: str, chars: int, tokenizer: Tokenizer, max_model_len: int) -> None:
    """Reject, before encoding it, a text too long to fit in max_model_len tokens whatever its
    tokens: encoding megabytes would hold the caller (an event loop) for seconds."""
    limit = tokenizer.max_token_chars * max_model_len
    if chars > limit:
        raise InvalidRequest(f"{field} is {chars} characters; {max_model_len} tokens (the context "
                             f"length) hold at most {limit}")


def check_request(ids: list[int], params: SamplingParams | None, max_model_len: int,
                  vocab_size: int) -> None:
    """Limits that depend on the engine: context length and vocabulary. `params=None` is a
    logits request (every position's logits, nothing sampled)."""
    if params is None:
        if len(ids) > max_model_len:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) exceeds max_model_len "
                                 f"({max_model_len})")
        return
    if not isinstance(params, SamplingParams):
        raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
    if len(ids) + params.max_tokens > max_model_len:
        raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len ({max_model_len})")
    if any(t >= vocab_size for t in params.stop_token_ids):
        raise InvalidRequest(f"stop_token_ids must be in [0, {vocab_size}), got "
                             f"{list(params.stop_token_ids)}")
    if any(t >= vocab_size for t, _ in params.logit_bias):
        raise InvalidRequest(f"logit_bias keys must be token ids in [0, {vocab_size}), got "
                             f"{[t for t, _ in params.logit_bias if t >= vocab_size][:5]}")
