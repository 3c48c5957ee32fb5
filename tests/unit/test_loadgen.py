"""bench/loadgen.py's clients tell the endings a draining server gives (an HTTP error event
followed by `data: [DONE]`, UNAVAILABLE, 503) from a cut stream and a hung one; the chaos
run's "server SIGINT" target counts on it (bench/chaos.py)."""
from __future__ import annotations

import asyncio
import json

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import loadgen

JOB = loadgen.Job(api="http", prompt="the king", max_tokens=8)
DRAINED_EVENT = {"error": {"message": "the server shut down before the request finished; retry "
                           "it", "type": "service_unavailable", "param": None, "code": 503}}


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
                    for e in events)


def chunk(ids: list[int]) -> dict:
    return {"choices": [{"token_ids": ids, "text": "x"}]}


def http_result(body: bytes) -> loadgen.Result:
    """_http_stream of JOB against a server whose completions stream is `body`."""
    async def go():
        transport = httpx2.MockTransport(lambda request: httpx2.Response(200, content=body))
        async with httpx2.AsyncClient(transport=transport, base_url="http://x") as client:
            result = loadgen.Result([])
            await loadgen._http_stream(client, "tiny", JOB, result)
            return result
    return asyncio.run(go())


def test_an_error_event_then_done_is_the_shutdown_ending():
    result = http_result(sse(chunk([1, 2]), DRAINED_EVENT, b"[DONE]"))
    assert (result.ids, result.status, result.done) == ([1, 2],
                                                        "error event: service_unavailable", True)
    assert "shut down" in result.detail
    assert loadgen.shutdown_ending(result)


def test_an_error_event_without_done_is_not():
    result = http_result(sse(chunk([1, 2]), DRAINED_EVENT))
    assert result.status == "error event: service_unavailable" and not result.done
    assert not loadgen.shutdown_ending(result)


@pytest.mark.parametrize("body, status", [(sse(chunk([1]), b"[DONE]"), "ok"),
                                          (sse(chunk([1])), "cut")])
def test_done_or_cut(body, status):
    result = http_result(body)
    assert (result.status, result.done) == (status, status == "ok")


def test_a_job_past_its_timeout_is_hung(monkeypatch):
    async def forever(client, model, job, result):
        result.ids.append(7)
        await asyncio.sleep(60)
    monkeypatch.setattr(loadgen, "_http_stream", forever)

    async def go():
        async with loadgen.Clients("127.0.0.1:1", "http://127.0.0.1:1", "tiny") as clients:
            return await clients.run(JOB, retries=3, timeout_s=0.05)
    result = asyncio.run(go())
    assert (result.status, result.ids, result.attempts) == ("hung", [7], 1)


def test_the_longest_stall_spans_a_retry(monkeypatch):
    """From the failed try's last chunk to the retry's first (0.2 s + the 0.5 s backoff), not
    only the gaps within the try that succeeded."""
    async def cut_then_whole(client, model, job, result):
        if result.attempts == 1:
            result.chunk([1])
            await asyncio.sleep(0.2)
            result.status = "cut"
        else:
            result.chunk([1, 2])
            result.done = True
    monkeypatch.setattr(loadgen, "_http_stream", cut_then_whole)

    async def go():
        async with loadgen.Clients("127.0.0.1:1", "http://127.0.0.1:1", "tiny") as clients:
            return await clients.run(JOB, retries=1)
    result = asyncio.run(go())
    assert (result.status, result.ids, result.attempts) == ("ok", [1, 2], 2)
    assert result.max_gap_s >= 0.65, result


ENDS = st.sampled_from([("ok", True), ("UNAVAILABLE", False), ("HTTP 503", False),
                        ("error event: service_unavailable", True),
                        ("error event: service_unavailable", False), ("cut", False),
                        ("hung", False), ("INTERNAL", False), ("error event: api_error", True)])


@given(st.lists(st.tuples(ENDS, st.integers(0, 4), st.booleans()), max_size=12))
def test_every_stream_is_sorted_once(cases):
    """completed + drained + cut + hung = requests; wrong: a completed stream's ids not the
    expected, a drained one's not a prefix of them."""
    want = [1, 2, 3, 4]
    results, expected = [], []
    for (status, done), n, bad in cases:
        ids = want[:n] if status != "ok" else want
        ids = [9] + ids[1:] if bad and ids else ids
        results.append(loadgen.Result(list(ids), status=status, done=done))
        expected.append(want)
    e = loadgen.check_endings(results, expected)
    assert e.completed + e.drained + e.cut + e.hung + sum(
        r.status == "ok" and r.ids != want for r in results) == len(cases)
    assert e.drained == sum(loadgen.shutdown_ending(r) for r in results)
    assert e.hung == sum(r.status == "hung" for r in results)
    assert e.wrong == sum(r.ids != want[:len(r.ids)] or (r.status == "ok" and r.ids != want)
                          for r in results if r.status == "ok" or loadgen.shutdown_ending(r))
    assert e.ok == (e.cut == 0 and e.hung == 0 and e.wrong == 0)
