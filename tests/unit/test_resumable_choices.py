"""actors/failover.py's ResumableStream with n choices, without Ray: after its frontend died, a
stream is sent again with one Resume per unfinished choice (its index, the tokens, logprobs and
top logprobs its client has, the characters of text sent), and it is `finished` only once every
choice has sent its last chunk."""
from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from actors import failover
from actors.failover import ResumableStream
from model.output import Resume, StreamChunk


def chunk(index: int, token: int, finish: str | None = None) -> StreamChunk:
    return StreamChunk("r", f"<{token}>", [token], [-token / 10], finish, index,
                       [[(token, -token / 10), (token + 1, -9.0)]])


class Frontend:
    """Sends `chunks`, then dies (RayActorError) if `dies`, else ends."""

    def __init__(self, chunks: list[StreamChunk], dies: bool):
        self.chunks, self.dies = list(chunks), dies

    async def __anext__(self) -> StreamChunk:
        if self.chunks:
            return self.chunks.pop(0)
        if self.dies:
            raise RayActorError()
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


def test_a_dead_frontends_stream_resumes_each_unfinished_choice(monkeypatch):
    """Choice 1 finished and choices 0 and 2 ran when the frontend died: the second call gets
    a Resume of choices 0 and 2 only, each with what its client received; `finished` turns
    true with the last choice's last chunk, not with the first choice's."""
    monkeypatch.setattr(failover, "RETRY_DELAY_S", 0.0)
    first = [chunk(0, 1), chunk(1, 2), chunk(2, 3), chunk(1, 4, "stop"), chunk(0, 5)]
    second = [chunk(2, 6, "length"), chunk(0, 7, "length")]
    calls = []

    def call(resume):
        calls.append(resume)
        return Frontend(first if resume is None else second, dies=resume is None)

    async def main():
        stream, finished = ResumableStream(call, choices=3), []
        got = []
        async for c in stream:
            got.append((c.index, c.token_ids[0]))
            finished.append(stream.finished)
        return got, finished

    got, finished = asyncio.run(main())
    assert got == [(0, 1), (1, 2), (2, 3), (1, 4), (0, 5), (2, 6), (0, 7)]
    assert finished == [False] * 6 + [True]
    top = [(1, -0.1), (2, -9.0)], [(5, -0.5), (6, -9.0)]
    assert calls == [None, (Resume((1, 5), (-0.1, -0.5), 6, top, 0),
                            Resume((3,), (-0.3,), 3, ([(3, -0.3), (4, -9.0)],), 2))]


@pytest.mark.parametrize("n", [1, 4])
def test_a_stream_is_finished_only_when_every_choice_is(n):
    async def main():
        stream = ResumableStream(lambda resume: Frontend(
            [chunk(i, i, "stop") for i in range(n)], dies=False), choices=n)
        return [stream.finished async for _ in stream]
    assert asyncio.run(main()) == [False] * (n - 1) + [True]
