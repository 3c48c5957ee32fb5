"""The HTTP API's `usage.prompt_tokens_details.cached_tokens` (issue 23) without a server: the
response builders (actors/serving/openai_responses.py) put the engine's cached_tokens in unary
bodies and the streamed usage chunk, the prompt counted once for n choices, and across a
failover the gateway reports what the last chunk said (the resuming engine's hit), both when
it collects a whole reply (engine_client.collect) and when it streams (http_app's events).
tests/e2e/test_cached_tokens.py has the same through Serve with the official clients."""
from __future__ import annotations

import asyncio
import json

import pytest
from ray.exceptions import RayActorError

from actors import failover
from actors.failover import ResumableStream
from actors.serving import http_app
from actors.serving import openai_responses as responses
from actors.serving.engine_client import collect
from model.output import Completion, StreamChunk
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()


def _event(event: str) -> dict:
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[len("data: "):])


@pytest.mark.parametrize("chat", [True, False])
def test_a_whole_reply_counts_the_cached_prompt_tokens_once(tokenizer, chat):
    out = responses.Response(chat, "m", tokenizer)
    done = [Completion("r", [1] * 40, [5, 6], "ab", "length", [-0.5] * 2, i, cached_tokens=32)
            for i in range(2)]
    assert out.whole(done, 40)["usage"] == {
        "prompt_tokens": 40, "completion_tokens": 4, "total_tokens": 44,
        "prompt_tokens_details": {"cached_tokens": 32}}


def test_the_usage_object_always_has_prompt_tokens_details(tokenizer):
    """OpenAI's shape: present with 0 when nothing was cached (clients read it unguarded)."""
    assert responses.usage(3, 2) == {"prompt_tokens": 3, "completion_tokens": 2,
                                     "total_tokens": 5,
                                     "prompt_tokens_details": {"cached_tokens": 0}}
    event = _event(responses.Response(True, "m", tokenizer).usage_chunk(3, 2, 2))
    assert event["choices"] == [] and event["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 2}


class Replica:
    """An engine replica's stream: one token per chunk from where the request resumes, each
    chunk saying `cached` (this replica's prefix-cache hit); it dies (RayActorError) when it
    reaches `dies_at`."""

    def __init__(self, length: int, start: int, cached: int, dies_at: int | None):
        self.length, self.position, self.cached, self.dies_at = length, start, cached, dies_at

    async def __anext__(self) -> StreamChunk:
        if self.position == self.dies_at:
            raise RayActorError()
        if self.position == self.length:
            raise StopAsyncIteration
        self.position += 1
        return StreamChunk("r", "x", [self.position], [0.0],
                           "length" if self.position == self.length else None,
                           cached_tokens=self.cached)

    def cancel(self) -> None:
        pass


def failing_over(length: int = 4, dies_at: int = 2) -> ResumableStream:
    """A request whose first replica hit 16 cached tokens and dies after `dies_at` tokens; the
    one that resumes it hits 48 (prompt + tokens so far)."""
    return ResumableStream(lambda resume: Replica(length, 0, 16, dies_at) if resume is None
                           else Replica(length, len(resume[0].token_ids), 48, None))


def test_a_collected_reply_reports_the_last_chunks_cached_tokens(monkeypatch):
    monkeypatch.setattr(failover, "RETRY_DELAY_S", 0.0)
    [done] = asyncio.run(collect(failing_over()))
    assert done.token_ids == [1, 2, 3, 4] and done.cached_tokens == 48
    [undisturbed] = asyncio.run(collect(failing_over(dies_at=None)))
    assert undisturbed.cached_tokens == 16


def test_the_streamed_usage_chunk_reports_the_last_chunks_cached_tokens(tokenizer, monkeypatch):
    monkeypatch.setattr(failover, "RETRY_DELAY_S", 0.0)

    async def events() -> list[str]:
        chunks = failing_over()
        first = await chunks.__anext__()
        out = responses.Response(False, "m", tokenizer)
        return [e async for e in http_app._events(out, first, chunks, 40, 1, True)]
    *tokens, usage, done = asyncio.run(events())
    assert len(tokens) == 4 and done == responses.DONE
    assert _event(usage)["usage"] == {"prompt_tokens": 40, "completion_tokens": 4,
                                      "total_tokens": 44,
                                      "prompt_tokens_details": {"cached_tokens": 48}}
