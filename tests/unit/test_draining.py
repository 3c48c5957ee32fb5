"""actors/serving/draining.py without Ray running: a replica's drain refuses new requests, lets
running streams go on until the grace (less the margin) and then ends them with Draining,
cancelling what they wait for; Serve's graceful shutdown begins it."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.serving import draining
from actors.serving.draining import ENDING_MARGIN_S, Drain, DrainedStream, Draining
from actors.serving.status import http_status_of, status_of


class Ticker:
    """A stream of ints, one every `period_s`, with a `cancel` (as a Serve response has)."""

    def __init__(self, period_s: float, n: int = 1000):
        self.period_s, self.n, self.i, self.cancelled = period_s, n, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        if self.i >= self.n:
            raise StopAsyncIteration
        await asyncio.sleep(self.period_s)
        self.i += 1
        return self.i

    def cancel(self) -> None:
        self.cancelled = True


async def stuck(aborted: list):
    """A request that never gets its next token; `aborted` gets True when it is closed."""
    try:
        yield 1
        await asyncio.sleep(3600)
        yield 2
    finally:
        aborted.append(True)


async def drained(stream, drain: Drain) -> tuple[list, BaseException | None]:
    items = []
    try:
        async for item in DrainedStream(stream, drain):
            items.append(item)
    except Draining as e:
        return items, e
    return items, None


@given(st.floats(0.0, 120.0))
def test_running_requests_end_a_margin_before_the_grace(grace_s):
    drain = Drain()
    before = time.monotonic()
    drain.begin(grace_s)
    run_s = drain.deadline - before
    assert grace_s - min(ENDING_MARGIN_S, grace_s / 2) - 0.1 <= run_s <= grace_s + 1e-3
    assert run_s >= grace_s / 2 - 1e-3           # a short grace is never all margin
    first = drain.deadline
    drain.begin(grace_s + 100)                   # a second begin changes nothing
    assert drain.deadline == first


def test_a_new_request_is_refused_once_draining_begins():
    drain = Drain()
    drain.check()                                # not draining: passes
    drain.begin(30)
    with pytest.raises(Draining):
        drain.check()
    assert status_of(Draining())[0] == grpc.StatusCode.UNAVAILABLE
    assert http_status_of(Draining()) == (503, "the server is shutting down; retry the request")


def test_a_stream_passes_through_untouched_without_a_drain():
    items, ended = asyncio.run(drained(Ticker(0.001, n=5), Drain()))
    assert items == [1, 2, 3, 4, 5] and ended is None


def test_a_short_stream_finishes_within_the_grace_and_a_long_one_ends_with_draining():
    async def main():
        drain = Drain()
        short, long = Ticker(0.01, n=5), Ticker(0.05)
        tasks = [asyncio.ensure_future(drained(s, drain)) for s in (short, long)]
        await asyncio.sleep(0.02)
        started = time.monotonic()
        drain.begin(0.8)                          # streams may run 0.4 s (margin: half)
        (short_items, short_end), (long_items, long_end) = await asyncio.gather(*tasks)
        return started, time.monotonic(), short_items, short_end, long_items, long_end, long
    started, ended, short_items, short_end, long_items, long_end, long = asyncio.run(main())
    assert short_items == [1, 2, 3, 4, 5] and short_end is None
    assert isinstance(long_end, Draining) and long.cancelled
    assert 0.35 <= ended - started <= 0.4 + 2 * draining.POLL_S
    assert 5 <= len(long_items) < 20


def test_a_stream_waiting_when_the_grace_ends_is_ended_and_its_generator_aborted():
    aborted = []

    async def main():
        drain = Drain()
        task = asyncio.ensure_future(drained(stuck(aborted), drain))
        await asyncio.sleep(0.05)
        drain.begin(0.0)
        result = await asyncio.wait_for(task, 2 * draining.POLL_S + 1)
        await asyncio.sleep(0)                   # the abandoned __anext__'s cancellation runs
        return result
    items, ended = asyncio.run(main())
    assert items == [1] and isinstance(ended, Draining) and aborted == [True]


def test_serve_graceful_shutdown_begins_the_replica_objects_drain(monkeypatch):
    """install() wraps Serve's Replica._perform_graceful_shutdown (Ray 2.60's private name):
    the object's drain begins with the deployment's graceful_shutdown_timeout_s, then Serve's
    own shutdown runs."""
    from ray.serve import context
    from ray.serve._private.replica import Replica

    calls = []

    async def original(self):
        calls.append(("serve", servable.drain.draining))
    monkeypatch.setattr(Replica, "_perform_graceful_shutdown", original)
    servable = SimpleNamespace(drain=Drain())
    monkeypatch.setattr(context, "_get_internal_replica_context",
                        lambda: SimpleNamespace(servable_object=servable))
    draining.install()
    draining.install()                            # idempotent: wrapped once
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(graceful_shutdown_timeout_s=30))
    began = time.monotonic()
    asyncio.run(Replica._perform_graceful_shutdown(replica))
    assert calls == [("serve", True)]
    assert 28.9 <= servable.drain.deadline - began <= 29.1


def test_a_consumer_cancelled_mid_wait_leaves_no_unretrieved_error_and_aclose_aborts_at_once():
    """The gateway's and engine's case when a client leaves: the consumer is cancelled while
    DrainedStream waits for an item. The abandoned item's error is retrieved (asyncio logged
    "Task exception was never retrieved" with a traceback per cancelled request), and
    `aclose()` runs the generator's `finally` at once, not when it is garbage-collected."""
    aborted, unretrieved = [], []

    class Failing(Ticker):                       # its item fails once it is abandoned
        async def __anext__(self):
            try:
                return await super().__anext__()
            except asyncio.CancelledError:
                raise RuntimeError("the engine call was cancelled") from None

    async def consume(chunks):
        async for _ in chunks:
            pass

    async def main():
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: unretrieved.append(context))
        for stream in (stuck(aborted), Failing(3600)):
            chunks = DrainedStream(stream, Drain())
            task = asyncio.ensure_future(consume(chunks))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await chunks.aclose()
            assert aborted == [True]
        for _ in range(3):
            await asyncio.sleep(0)
    asyncio.run(main())
    import gc
    gc.collect()
    assert unretrieved == []


def test_an_engine_replica_that_drains_hands_its_requests_to_another():
    """An engine replica scaled down or redeployed ends its long requests with Draining (sent
    as a value, as EngineServer.stream does): the gateway's ResumableStream resumes each on
    another replica, so the client gets every token once and no error."""
    from actors import failover
    from actors.failover import ResumableStream
    from model.output import StreamChunk

    class Replica(Ticker):                      # positions start.., Draining at `drains_at`
        def __init__(self, start: int, drains_at: int | None):
            super().__init__(0.0, 8)
            self.i, self.drains_at = start, drains_at

        async def __anext__(self):
            if self.i == self.drains_at:
                self.drains_at = None
                return Draining()
            position = await super().__anext__() - 1
            return StreamChunk("r", "x", [position], [0.0], "length" if position == 7 else None)

    calls = []

    def call(resume):
        start = len(resume[0].token_ids) if resume else 0   # choice 0 of n = 1
        calls.append(start)
        return Replica(start, 3 if not calls[:-1] else None)   # the first replica drains at 3

    async def main():
        return [t async for chunk in ResumableStream(call) for t in chunk.token_ids]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(failover, "RETRY_DELAY_S", 0.0)
        assert asyncio.run(main()) == list(range(8))
    assert calls == [0, 3]
