"""Between steps: what waits for the next step boundary (a mixin of model/engine.py's Engine,
which owns the state it reads: scheduler, tracked requests, step lock).

Adds, aborts and `run_between_steps` calls are queued under a lock held for microseconds and
applied in their order at the next step boundary, at once when no step runs: a new stream or a
client going away never waits for a running step. A request whose grammar is still compiling
(structured outputs, model/grammar.py) is held, unscheduled, until its compile's done-callback
queues it again; a grammar that fails to compile fails that request alone.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING

from model.errors import QueueFull
from model.step_outputs import Tracked

if TYPE_CHECKING:
    from model.scheduler import Scheduler


class BetweenSteps:
    """Engine's queue of adds, aborts and between-step calls (see the module docstring)."""
    scheduler: Scheduler
    max_waiting: int
    step_lock: threading.RLock
    _pending_lock: threading.Lock
    _pending: list
    _held: list[Tracked]
    _tracked: dict[str, Tracked]

    def _admit(self, batch: list[Tracked]) -> None:
        """Queue a validated batch whole, or raise QueueFull and queue none of it."""
        with self._pending_lock:
            waiting = len(self.scheduler.waiting) + len(self._held) + sum(
                isinstance(p, Tracked) for p in self._pending)
            if waiting >= self.max_waiting:
                raise QueueFull(f"{waiting} requests are waiting (max_waiting={self.max_waiting}); "
                                "try again later")
            for tracked in batch:
                self._tracked[tracked.req.request_id] = tracked
            self._pending += batch
        self._apply_pending_if_idle()

    def abort(self, request_id: str) -> None:
        """Drop a request and return its KV blocks: at once when no step runs, else at the end
        of the running step (it never waits for one). No-op if it already finished."""
        with self._pending_lock:
            self._pending.append(request_id)
        self._apply_pending_if_idle()

    def run_between_steps(self, fn) -> concurrent.futures.Future:
        """Run `fn()` at the next step boundary (at once when no step runs), never inside a
        step, without waiting for one here: the future gets its result or exception. The
        distributed frontend swaps its expert actors this way (actors/frontend.py)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._pending_lock:
            self._pending.append((fn, future))
        self._apply_pending_if_idle()
        return future

    def _apply_pending_if_idle(self) -> None:
        """Apply what is queued if no step runs; again after releasing the lock if something
        was queued meanwhile by a thread that found the lock taken (nothing waits for a step
        that may never come)."""
        while self.step_lock.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self.step_lock.release()
            with self._pending_lock:
                if not self._pending:
                    return

    def _apply_pending(self) -> None:
        """Apply queued adds and aborts in their order (caller holds the step lock)."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for item in pending:
            if isinstance(item, Tracked):
                self._start(item)
                continue
            if isinstance(item, tuple):                        # run_between_steps
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller's, through its future
                    future.set_exception(e)
                continue
            tracked = self._tracked.pop(item, None)
            for req in tracked.reqs if tracked is not None else ():
                if not req.finished:
                    req.finish_reason = "abort"
                    self.scheduler.finish(req)

    def _start(self, tracked: Tracked) -> None:
        """Schedule an admitted request (caller holds the step lock). One whose grammar is
        still compiling is held (its compile's done-callback, `_release`, queues it again);
        one whose grammar failed fails alone; one aborted while held is dropped."""
        future = tracked.grammar
        if future is not None:
            with self._pending_lock:
                if not future.done():
                    self._held.append(tracked)
                    return
            tracked.grammar = None
            if tracked.req.finished:
                return
            if future.exception() is not None:
                self._fail(tracked.req, future.exception())
                return
            tracked.outputs[0] = self._output(tracked.req, future.result())
        for req in tracked.reqs:
            self.scheduler.add(req)

    def _release(self, tracked: Tracked) -> None:
        """A held request's grammar is compiled: queue it to start at the next boundary."""
        with self._pending_lock:
            if tracked not in self._held:
                return                  # not held yet: _start will find its compile done
            self._held.remove(tracked)
            self._pending.append(tracked)
        self._apply_pending_if_idle()

    def has_unfinished(self) -> bool:
        """Whether any request is queued, held for its grammar, waiting or running (pending
        aborts do not count)."""
        return (self.scheduler.has_unfinished() or bool(self._held)
                or any(isinstance(p, Tracked) for p in self._pending))
