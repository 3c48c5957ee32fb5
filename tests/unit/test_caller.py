"""actors/serving/caller.py's CallerWatch without Ray: a call is cancelled once its caller is
known to be gone, never while it is alive or unknown, and the watch stops polling with no call
left."""
from __future__ import annotations

import asyncio

import pytest

from actors.serving.caller import CallerWatch, caller_of, watched

POLL_S = 0.01


class Callers:
    """is_alive for the watch: actor id -> True / False / None (unknown); counts the asks."""

    def __init__(self, **states):
        self.states, self.asked = states, 0

    def __call__(self, actor_id: str):
        self.asked += 1
        return self.states.get(actor_id)


async def call(watch: CallerWatch, caller, seconds: float) -> str:
    try:
        async with watch.cancel_if_gone(caller):
            await asyncio.sleep(seconds)
        return "done"
    except asyncio.CancelledError:
        return "cancelled"


async def counting():
    """0, 1, 2, ... one every 10 ms (a stream for `watched`)."""
    for i in range(1000):
        await asyncio.sleep(0.01)
        yield i


@pytest.mark.parametrize("state,want", [(True, "done"), (None, "done"), (False, "cancelled")])
def test_a_call_is_cancelled_only_once_its_caller_is_known_gone(state, want):
    async def main():
        watch = CallerWatch(POLL_S, Callers(a=state))
        return await call(watch, "a", 0.2)
    assert asyncio.run(main()) == want


def test_only_the_dead_callers_calls_are_cancelled_and_polling_stops():
    async def main():
        callers = Callers(a=True, b=True)
        watch = CallerWatch(POLL_S, callers)
        calls = [asyncio.create_task(call(watch, c, 0.3)) for c in ("a", "a", "b", None)]
        await asyncio.sleep(0.05)
        callers.states["a"] = False
        results = await asyncio.gather(*calls)
        asked = callers.asked
        await asyncio.sleep(0.05)
        return results, asked, callers.asked, watch._loops, watch._calls
    results, asked, later, loops, calls = asyncio.run(main())
    assert results == ["cancelled", "cancelled", "done", "done"]
    assert later <= asked + 1 and loops == {} and calls == {}    # no call left: no polling


def test_a_watched_stream_ends_with_cancelled_error_when_its_caller_dies():
    async def main():
        import actors.serving.caller as caller
        callers = Callers(g=True)
        loop = asyncio.get_running_loop()
        caller._watches[loop] = CallerWatch(POLL_S, callers)
        got = []
        try:
            async for i in watched(counting(), "g"):
                got.append(i)
                if i == 3:
                    callers.states["g"] = False
        except asyncio.CancelledError:
            return got, "cancelled"
        return got, "done"
    got, how = asyncio.run(main())
    assert how == "cancelled" and 4 <= len(got) < 1000


def test_a_context_without_a_stamp_has_no_caller():
    assert caller_of(object()) is None


def test_a_watched_stream_whose_items_are_awaited_in_tasks_of_their_own_is_cancelled():
    """As actors/serving/draining.py's DrainedStream awaits each item: the task to cancel is
    the one awaiting the item now, not the one that awaited the first."""
    async def main():
        import actors.serving.caller as caller
        callers = Callers(g=True)
        caller._watches[asyncio.get_running_loop()] = CallerWatch(POLL_S, callers)
        stream, got = watched(counting(), "g"), []
        try:
            while True:
                got.append(await asyncio.ensure_future(stream.__anext__()))
                if got[-1] == 3:
                    callers.states["g"] = False
        except asyncio.CancelledError:
            return got, "cancelled"
        except StopAsyncIteration:
            return got, "done"
    got, how = asyncio.run(main())
    assert how == "cancelled" and 4 <= len(got) < 1000
