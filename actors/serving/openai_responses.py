"""The OpenAI-compatible HTTP API's response bodies: a whole completion, stream chunks as
server-sent events and the model list (errors: actors/serving/openai_errors.py, re-exported
here). Pure; requests are actors/serving/openai_api.py's; tool calls in replies are
actors/serving/openai_tool_calls.py's.

Follows OpenAI's API reference (https://platform.openai.com/docs/api-reference). Streams are
server-sent events, one `data: {chunk}` per engine chunk (with `n` > 1 the choices' chunks
interleave, each naming its `index`), then (with `stream_options.include_usage`) a chunk with
empty `choices` and the usage (the prompt counted once, every choice's tokens; in
`prompt_tokens_details.cached_tokens` the prompt tokens the engine's prefix cache held, the
request's last chunk's value), then `data: [DONE]`. Errors are {"error": {"message", "type",
"param", "code"}}.

Logprobs, OpenAI's shapes: chat `logprobs.content[i] = {token, logprob, bytes, top_logprobs:
[{token, logprob, bytes}]}` (the k alternatives, most likely first); completions `logprobs =
{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`, each top_logprobs
entry the chosen token and its k alternatives (OpenAI's "up to logprobs + 1"; vLLM's too).
Two tokens can spell the same string: a {token: logprob} entry then keeps the first (the chosen
token, then the likelier), as OpenAI's dict keeps one. With `echo` the prompt tokens' entries
come first, the first one's logprob and top_logprobs null (nothing precedes it). vLLM's
`prompt_logprobs` (completions: in each choice; chat: in the body; streamed: on a choice's
first chunk): a list with one entry per prompt token, the first null, the others {token id:
{logprob, rank, decoded_token}} for the prompt token then its alternatives; `rank` is 1 + the
number of tokens more likely (as vLLM's; an alternative's, its place among the k). A logprob
of -inf is written -9999.0, as OpenAI and vLLM write it (JSON has no infinity).
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Sequence

from actors.info import EngineInfo
from actors.serving.openai_api import ChatCompletionRequest, CompletionRequest
from actors.serving.openai_errors import ERROR_TYPES as ERROR_TYPES  # re-exported
from actors.serving.openai_errors import error_body as error_body  # re-exported
from actors.serving.openai_tool_calls import ChoiceCalls
from model.output import Completion, PromptLogprob, StreamChunk
from model.sampling import TopLogprobs
from model.tokenizer import Tokenizer
from model.tools import ToolCallParser

LOGPROB_FLOOR = -9999.0         # -inf as OpenAI's and vLLM's servers write it


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: the prompt tokens whose KV the engine took from
    its prefix cache (prompt_tokens_details, always present, as OpenAI's)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_text(data: bytes) -> str:
    """A token's string in logprobs: its text, or, for a token that is part of a UTF-8
    character (a byte token), "bytes:" and its bytes escaped, as OpenAI's API writes it
    ("bytes:\\xe2\\x80"); the exact bytes go in `bytes` (chat)."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _lp(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a request asked to see: `logprobs` (the logprobs object), `top_logprobs` (the
    alternatives per echoed prompt token, completions' `logprobs: k`), `prompt_logprobs`
    (vLLM's field, with this many alternatives; None: absent), `echo` (the prompt's text, put
    before each choice's; None: no echo), `token_ids` (vLLM's `return_token_ids`)."""
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    echo: str | None = None
    token_ids: bool = False


def shape_of(r: ChatCompletionRequest | CompletionRequest, chat: bool, tokenizer: Tokenizer,
             prompt_ids: Sequence[int]) -> Shape:
    """What request `r` asked to see. The echoed prompt is its ids decoded (the tokenizer
    round-trips text: the same as a text prompt)."""
    if chat:
        return Shape(logprobs=r.logprobs, prompt_logprobs=r.prompt_logprobs,
                     token_ids=r.return_token_ids)
    return Shape(logprobs=r.logprobs is not None, top_logprobs=r.logprobs or 0,
                 prompt_logprobs=r.prompt_logprobs, token_ids=r.return_token_ids,
                 echo=tokenizer.decode(prompt_ids) if r.echo else None)


class _ChoiceState:
    """One choice's place in a stream: whether its first chunk went out, (completions) the
    character offset of its next token, from the engine's detokenizer replayed, and (chat
    with tools) its tool calls' parser."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], start: int,
                 parser: ToolCallParser | None):
        self.started = False
        self.text_offset = start
        self.detok = tokenizer.detokenizer(prompt_ids)
        self.calls = ChoiceCalls(parser) if parser is not None else None


class Response:
    """Builds the bodies of one request's response: the whole one or its stream chunks.
    `parsers`: a new ToolCallParser per choice (or None: plain text), for a chat with tools
    (validation.ToolInputs.parser)."""

    def __init__(self, chat: bool, model: str, tokenizer: Tokenizer, shape: Shape = Shape(),
                 prompt_ids: Sequence[int] = (),
                 parsers: Callable[[], ToolCallParser | None] | None = None):
        self.chat, self.model, self.tokenizer, self.shape = chat, model, tokenizer, shape
        self.parsers = parsers
        self.prompt_ids = list(prompt_ids)
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._choices: dict[int, _ChoiceState] = {}
        self._prompt_sent = False            # chat streams: vLLM's field once, in the body

    def _state(self, index: int) -> _ChoiceState:
        if index not in self._choices:
            start = len(self.shape.echo) if self.shape.echo is not None else 0
            parser = self.parsers() if self.parsers is not None else None
            self._choices[index] = _ChoiceState(self.tokenizer, self.prompt_ids, start, parser)
        return self._choices[index]

    def _entry(self, token: int, logprob: float) -> dict:
        data = self.tokenizer.token_bytes(token)
        return {"token": token_text(data), "logprob": _lp(logprob), "bytes": list(data)}

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[float],
                       tops: list[TopLogprobs]) -> dict:
        """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        return {"content": [self._entry(t, lp) | {"top_logprobs": [self._entry(*a) for a in top]}
                            for t, lp, top in zip(token_ids, logprobs, tops)]}

    def _string(self, token: int) -> str:
        return token_text(self.tokenizer.token_bytes(token))

    def _legacy_top(self, chosen: str, logprob: float, top: TopLogprobs) -> dict:
        """{token: logprob} of the chosen token (its string `chosen`) and its alternatives; a
        repeated string keeps its first (likelier) value."""
        entry = {chosen: _lp(logprob)}
        for t, lp in top:
            entry.setdefault(self._string(t), _lp(lp))
        return entry

    def _legacy_logprobs(self, state: _ChoiceState, token_ids: list[int], logprobs: list[float],
                         tops: list[TopLogprobs]) -> dict:
        """The completions object {tokens, token_logprobs, top_logprobs, text_offset}.
        `text_offset`: each token's character offset in the choice's text, counted across a
        stream's chunks: the length of the text before it (the echoed prompt's, then what the
        tokens before it spelled after the prompt; a character spelled by byte tokens counts
        once its last byte is there)."""
        offsets = []
        for t in token_ids:
            offsets.append(state.text_offset)
            state.text_offset += len(state.detok.push(t))   # the engine's detokenizer, replayed
        tokens = [self._string(t) for t in token_ids]
        return {"tokens": tokens, "token_logprobs": [_lp(lp) for lp in logprobs],
                "top_logprobs": [self._legacy_top(*e) for e in zip(tokens, logprobs, tops)],
                "text_offset": offsets}

    def _echoed_logprobs(self, prompt: list[PromptLogprob]) -> dict:
        """The prompt tokens' completions logprobs (echo): the first one's null. The tokens
        spell the echoed text: the first word's leading space, which decoding drops at a text's
        start (SentencePiece's dummy prefix), is dropped from its token too."""
        k, detok, offset = self.shape.top_logprobs, self.tokenizer.detokenizer(), 0
        tokens, offsets = [], []
        for t in self.prompt_ids:
            token, delta = self._string(t), detok.push(t)
            tokens.append(delta if token.startswith(" ") and delta == token[1:] else token)
            offsets.append(offset)
            offset += len(delta)
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else _lp(e[0]) for e in prompt],
                "top_logprobs": [None if e is None else self._legacy_top(t, e[0], e[1][:k])
                                 for t, e in zip(tokens, prompt)],
                "text_offset": offsets}

    def vllm_prompt_logprobs(self, prompt: list[PromptLogprob]) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob,
        rank, decoded_token}}, the prompt token first, then its alternatives (keys as JSON
        writes them: strings)."""
        k, out = self.shape.prompt_logprobs, []
        for token, entry in zip(self.prompt_ids, prompt):
            if entry is None:
                out.append(None)
                continue
            logprob, top = entry[0], entry[1][:k]
            ranks = {t: rank for rank, (t, _) in enumerate(top, 1)}
            if len(entry) > 2:                      # the engine's rank of the prompt token
                ranks[token] = entry[2]
            row = {}
            for t, lp in [(token, logprob), *top]:
                row.setdefault(str(t), {"logprob": _lp(lp), "rank": ranks.get(t),
                                        "decoded_token": self._string(t)})
            out.append(row)
        return out

    def _choice(self, c: Completion | StreamChunk, state: _ChoiceState, first: bool) -> dict:
        """The fields of one choice common to a whole response and a chunk (first: the choice's
        first chunk, or a whole choice: the echoed prompt goes with it)."""
        tops = c.top_logprobs or [[] for _ in c.token_ids]
        echo_logprobs = first and self.shape.echo is not None and c.prompt_logprobs is not None
        choice = {"index": c.index, "finish_reason": c.finish_reason, "logprobs": None}
        if self.shape.logprobs and self.chat:
            choice["logprobs"] = self._chat_logprobs(c.token_ids, c.logprobs, tops)
        elif self.shape.logprobs:
            logprobs = self._legacy_logprobs(state, c.token_ids, c.logprobs, tops)
            if echo_logprobs:
                prompt = self._echoed_logprobs(c.prompt_logprobs)
                logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
            choice["logprobs"] = logprobs
        if self.shape.token_ids:
            choice["token_ids"] = list(c.token_ids)
        if (not self.chat and first and self.shape.prompt_logprobs is not None
                and c.prompt_logprobs is not None):
            choice["prompt_logprobs"] = self.vllm_prompt_logprobs(c.prompt_logprobs)
        return choice

    def _text(self, text: str, first: bool) -> str:
        return self.shape.echo + text if first and self.shape.echo is not None else text

    def whole(self, completions: Sequence[Completion], prompt_tokens: int) -> dict:
        """The response body of a whole request: one choice per completion (by index)."""
        choices = []
        for c in sorted(completions, key=lambda c: c.index):
            state = self._state(c.index)
            choice = self._choice(c, state, first=True)
            if self.chat and state.calls is not None:
                choice["message"], choice["finish_reason"] = state.calls.message(c)
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = self._text(c.text, first=True)
            choices.append(choice)
        cached = completions[0].cached_tokens if completions else 0   # the same on each choice
        body = {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices,
                "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in completions), cached)}
        return body | self._chat_prompt_logprobs(completions)

    def _chat_prompt_logprobs(self, outputs: Sequence[Completion | StreamChunk]) -> dict:
        """Chat's vLLM `prompt_logprobs`, a field of the body: once per response."""
        if not self.chat or self.shape.prompt_logprobs is None or self._prompt_sent:
            return {}
        for c in outputs:
            if c.prompt_logprobs is not None:
                self._prompt_sent = True
                return {"prompt_logprobs": self.vllm_prompt_logprobs(c.prompt_logprobs)}
        return {}

    def chunk(self, c: StreamChunk) -> str:
        """One server-sent event for an engine stream chunk (of choice `c.index`)."""
        state = self._state(c.index)
        first, state.started = not state.started, True
        choice = self._choice(c, state, first)
        if self.chat:
            delta = {"content": c.text}
            if state.calls is not None:
                delta, choice["finish_reason"] = state.calls.delta(c)
            choice["delta"] = {"role": "assistant"} | delta if first else delta
        else:
            choice["text"] = self._text(c.text, first)
        return self._event({"choices": [choice]} | self._chat_prompt_logprobs([c]))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int,
                    cached_tokens: int = 0) -> str:
        """The stream's usage chunk (`stream_options.include_usage`): empty `choices`."""
        return self._event({"choices": [],
                            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})

    def _event(self, body: dict) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                    **body})


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


DONE = sse("[DONE]")


def model_card(model: str, info: EngineInfo, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "mixtral-ep",
            "max_model_len": info.context_length}


def models_body(model: str, info: EngineInfo, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, info, created)]}
