"""The OpenAI-compatible HTTP API's response bodies: a whole completion, stream chunks as
server-sent events, errors in OpenAI's shape and the model list. Pure; requests are
actors/serving/openai_api.py's.

Follows OpenAI's API reference (https://platform.openai.com/docs/api-reference). Streams are
server-sent events, one `data: {chunk}` per engine chunk, then (with
`stream_options.include_usage`) a chunk with empty `choices` and the usage, then `data: [DONE]`.
Errors are {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence

from actors.info import EngineInfo
from actors.serving.openai_api import REQUEST_FIELDS
from model.tokenizer import Tokenizer

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
               500: "internal_server_error"}
# a message that starts with a request field ("max_tokens must be...", "messages[0].role: ...")
# names it in the error's `param` too
_LEADING_FIELD = re.compile(r"([a-z_]+)(\[\d+\](\.[a-z_]+)?)?(?=[ :])")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(data: bytes) -> str:
    """A token's string in logprobs: its text, or, for a token that is part of a UTF-8
    character (a byte token), "bytes:" and its bytes escaped, as OpenAI's API writes it
    ("bytes:\\xe2\\x80"); the exact bytes go in `bytes` (chat)."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class Response:
    """Builds the bodies of one request's response: the whole one or its stream chunks."""

    def __init__(self, chat: bool, model: str, tokenizer: Tokenizer, logprobs: bool,
                 token_ids: bool = False, prompt_ids: Sequence[int] = ()):
        self.chat, self.model, self.tokenizer, self.logprobs = chat, model, tokenizer, logprobs
        self.token_ids = token_ids
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._text_offset = 0
        self._text = tokenizer.detokenizer(prompt_ids)

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict:
        """Chat's {"content": [{token, logprob, bytes, top_logprobs}]} or the legacy completions
        object {tokens, token_logprobs, top_logprobs, text_offset}, chosen tokens only.
        `text_offset`: each token's character offset in the completion's text, counted across
        a stream's chunks: the length of the text the tokens before it spelled after the prompt
        (a character spelled by byte tokens counts once its last byte is there)."""
        data = [self.tokenizer.token_bytes(t) for t in token_ids]
        tokens = [token_text(d) for d in data]
        if self.chat:
            return {"content": [{"token": tok, "logprob": lp, "bytes": list(d), "top_logprobs": []}
                                for tok, lp, d in zip(tokens, logprobs, data)]}
        offsets = []
        for t in token_ids:
            offsets.append(self._text_offset)
            self._text_offset += len(self._text.push(t))   # the engine's detokenizer, replayed
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None,
                "text_offset": offsets}

    def _choice(self, token_ids: list[int], logprobs: list[float], finish_reason) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.logprobs:
            choice["logprobs"] = self._logprobs(token_ids, logprobs)
        if self.token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def whole(self, text: str, token_ids: list[int], logprobs: list[float], finish_reason: str,
              prompt_tokens: int) -> dict:
        choice = self._choice(token_ids, logprobs, finish_reason)
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(prompt_tokens, len(token_ids))}

    def chunk(self, text: str, token_ids: list[int], logprobs: list[float],
              finish_reason: str | None, first: bool = False) -> str:
        """One server-sent event for a stream chunk."""
        choice = self._choice(token_ids, logprobs, finish_reason)
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        return self._event({"choices": [choice]})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self._event({"choices": [], "usage": usage(prompt_tokens, completion_tokens)})

    def _event(self, body: dict) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                    **body})


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


DONE = sse("[DONE]")


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object; a 400 whose message starts with a field names it in `param`."""
    if param is None and status == 400 and (m := _LEADING_FIELD.match(message)) \
            and m.group(1) in REQUEST_FIELDS:
        param = m.group(0)
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"),
                      "param": param, "code": code}}


def model_card(model: str, info: EngineInfo, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "mixtral-ep",
            "max_model_len": info.context_length}


def models_body(model: str, info: EngineInfo, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, info, created)]}
