"""The application's metrics without Ray (actors/serving/metrics.py): a request's metrics, taken
at the gateway as its chunks leave the ResumableStream, count it once however many engine
replicas died under it; the engine replica's flushing thread survives a failed flush and a
dead one fails the replica's health check."""
from __future__ import annotations

import asyncio
import collections
import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.exceptions import RayActorError

from actors import failover
from actors.failover import ResumableStream
from actors.serving.metrics import EngineMetrics, RequestMetrics
from model.output import StreamChunk


class Recorder:
    """A Ray metric's stand-in: every inc / observe call, with its tags."""

    def __init__(self):
        self.calls: list[tuple[float, tuple]] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.calls.append((value, tuple(sorted((tags or {}).items()))))

    observe = inc

    def sum(self) -> float:
        return sum(v for v, _ in self.calls)


def recorded() -> RequestMetrics:
    metrics = RequestMetrics()
    for name in ("ttft", "itl", "e2e", "prompt_tokens", "generation_tokens", "finished"):
        setattr(metrics, name, Recorder())
    return metrics


class Frontend:
    """An engine replica that yields one token per chunk from where the request resumes, and
    dies (RayActorError) when it reaches a position in `deaths` (each kills one replica)."""

    def __init__(self, length: int, deaths: set[int], start: int):
        self.length, self.deaths, self.position = length, deaths, start

    async def __anext__(self) -> StreamChunk:
        if self.position in self.deaths:
            self.deaths.discard(self.position)
            raise RayActorError()
        if self.position == self.length:
            raise StopAsyncIteration
        self.position += 1
        return StreamChunk("r", "x", [self.position], [0.0],
                           "length" if self.position == self.length else None)

    def cancel(self) -> None:
        pass


@settings(max_examples=50, deadline=None)
@given(length=st.integers(1, 12), prompt=st.integers(1, 50), data=st.data())
def test_a_request_counts_once_however_many_replicas_die_under_it(length, prompt, data):
    """Replicas die at any positions (one each): the prompt, first token, end and finish
    reason are counted once, every delivered token once."""
    deaths = data.draw(st.sets(st.integers(0, length - 1), max_size=length), label="deaths")
    metrics = recorded()
    stream = ResumableStream(
        lambda resume: Frontend(length, deaths, len(resume[0].token_ids) if resume else 0),
        observe=metrics.request(prompt).chunk)

    async def drain():
        return [t async for chunk in stream for t in chunk.token_ids]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(failover, "RETRY_DELAY_S", 0.0)
        assert asyncio.run(drain()) == list(range(1, length + 1))
    assert not deaths                                   # every replica that was to die did
    assert metrics.prompt_tokens.calls == [(prompt, ())]
    assert len(metrics.ttft.calls) == 1 and len(metrics.e2e.calls) == 1
    assert len(metrics.itl.calls) == length - 1
    assert metrics.generation_tokens.sum() == length
    assert metrics.finished.calls == [(1.0, (("finished_reason", "length"),))]


def test_n_choices_are_one_request():
    """n = 3: the prompt and TTFT once, every choice's tokens, one end with the last choice's
    reason, whichever order the choices finish in."""
    metrics = recorded()
    request = metrics.request(5, choices=3)
    for index, reason in ((0, None), (1, None), (2, None), (1, "stop"), (0, None), (2, "length"),
                          (0, "length")):
        request.chunk(StreamChunk("r", "x", [7], [0.0], reason, index))
    assert metrics.prompt_tokens.calls == [(5, ())]
    assert len(metrics.ttft.calls) == 1 and len(metrics.e2e.calls) == 1
    assert metrics.generation_tokens.sum() == 7
    assert metrics.finished.calls == [(1.0, (("finished_reason", "length"),))]


def test_a_request_with_no_chunk_counts_nothing():
    """Refused before its first chunk (a bad request, a full queue): no prompt tokens."""
    metrics = recorded()
    metrics.request(9)
    assert all(not getattr(metrics, n).calls for n in ("prompt_tokens", "ttft", "finished"))


class Boom(BaseException):
    """What kills a thread whatever it catches: not an Exception."""


class Scheduler:
    def __init__(self, error: BaseException):
        self.error = error

    @property
    def running(self):
        raise self.error


def engine_metrics(error: BaseException) -> EngineMetrics:
    """EngineMetrics whose every flush raises `error`, flushing every 10 ms."""
    engine = type("Engine", (), {})()
    engine.scheduler = Scheduler(error)
    engine.kv = type("KV", (), {"allocator": None})()
    return EngineMetrics(engine, dispatcher=None, expert_load=None, interval_s=0.01)


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_failing_flush_is_logged_once_and_the_thread_goes_on(caplog):
    caplog.set_level(logging.WARNING, logger="ray.serve.actors.serving.metrics")
    metrics = engine_metrics(ValueError("no scheduler"))
    try:
        wait_for(lambda: caplog.records)
        time.sleep(0.1)                                 # ten more failed flushes
        metrics.check()                                 # alive: the health check passes
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "engine metrics flush failed" in caplog.records[0].getMessage()
    finally:
        metrics.close()


def test_a_dead_metrics_thread_is_logged_and_fails_the_health_check(caplog):
    caplog.set_level(logging.ERROR, logger="ray.serve.actors.serving.metrics")
    metrics = engine_metrics(Boom())
    wait_for(lambda: not metrics.flusher.thread.is_alive())
    with pytest.raises(RuntimeError, match="engine metrics thread died"):
        metrics.check()
    assert collections.Counter(r.levelname for r in caplog.records) == {"ERROR": 1}


def test_a_closed_metrics_thread_passes_the_health_check():
    metrics = engine_metrics(ValueError("no scheduler"))
    metrics.close()
    wait_for(lambda: not metrics.flusher.thread.is_alive())
    metrics.check()


def test_the_prefix_cache_counters_add_what_the_engine_counted_since_the_last_flush():
    """Issue 23: mixtral_ep_prefix_cache_queries / _hits grow by the engine's cumulative
    PrefixCacheStats' increase at each flush (tokens), never by a flush that saw nothing new."""
    from model.prefix_cache import PrefixCacheStats
    metrics = engine_metrics(ValueError("unused"))
    metrics.close()                                     # flushed here only, by hand
    stats = metrics.engine.scheduler.prefix_cache = PrefixCacheStats()
    metrics.cache_queries, metrics.cache_hits = Recorder(), Recorder()
    for queries, hits in ((40, 32), (40, 32), (97, 32), (120, 48)):
        stats.queries, stats.hits = queries, hits
        metrics._flush_prefix_cache()
    assert metrics.cache_queries.calls == [(40, ()), (57, ()), (23, ())]
    assert metrics.cache_hits.calls == [(32, ()), (16, ())]
