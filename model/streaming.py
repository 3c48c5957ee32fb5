"""Asyncio streams over a synchronous engine: one worker thread steps the engine while any
stream waits, and each step's chunks reach their streams through per-request sinks.

    streams = Streams(engine.step, engine.has_unfinished)
    engine.step() hands each chunk to `streams.deliver(chunk)`, each failure to `streams.fail`
    async for chunk in streams.follow(request_id, admit, abort=engine.abort): ...

One thread runs every step, so steps do not hop over a pool of threads (each thread that runs
torch gets its own OpenMP pool; two such threads slowed each other here). Steps driven by
`Engine.generate` in another thread lose nothing either: chunks go to the sinks whoever steps.
Leaving `follow` early (a client that went away) aborts the request.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable

log = logging.getLogger(__name__)


class Streams:
    def __init__(self, step: Callable[[], object], has_work: Callable[[], bool]):
        self._step, self._has_work = step, has_work
        self._sinks: dict[str, Callable[[object], None]] = {}
        self._task: asyncio.Task | None = None
        self._stepper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-step")

    def deliver(self, request_id: str, item) -> None:
        """Hand a chunk (or the request's exception) to its stream, if one is listening."""
        sink = self._sinks.get(request_id)
        if sink is not None:
            sink(item)

    async def follow(self, request_id: str, admit: Callable[[], None],
                     abort: Callable[[str], None], choices: int = 1) -> AsyncIterator:
        """Listen for the request, `admit()` it, then yield its chunks until each of its
        `choices` (chunk.index) has sent one with a finish_reason; raise its error. Listening
        first means no chunk can be missed."""
        finished: set[int] = set()
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._sinks[request_id] = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
        try:
            admit()
            self._ensure_loop()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished.add(item.index)
                    if len(finished) == choices:
                        return
        finally:
            self._sinks.pop(request_id, None)
            abort(request_id)

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Step while streams wait; a failed step already failed its requests, others go on."""
        loop = asyncio.get_running_loop()
        while self._sinks and self._has_work():
            try:
                await loop.run_in_executor(self._stepper, self._step)
            except Exception:
                log.exception("engine step failed")
