"""Draining a Serve replica (gateway or engine) before it stops: when Serve stops a replica
(scale-down, redeploy, `serve shutdown`, or the SIGINT'd launcher: deploy/__main__.py), new
requests are refused with UNAVAILABLE / HTTP 503, requests in flight go on for the grace
period, and those still running then end with an error the client sees (an error event and
`data: [DONE]` over HTTP, UNAVAILABLE over gRPC) instead of a cut connection.

    drain = Drain()                                  # one per replica
    drain.check()                                    # at a request's start: Draining if stopping
    chunks = DrainedStream(engine_stream, drain)     # its chunks; Draining once the grace is over

The grace is the deployment's `graceful_shutdown_timeout_s` (deploy/serve.yaml): Serve kills
a replica that has not stopped by then, so streams end `ending_margin_s` (ENDING_MARGIN_S, at
most half the grace) before it, leaving time for their last message to reach the proxy.

Serve has no hook for "this replica starts stopping": Serve's replica (Ray 2.60,
ray/serve/_private/replica.py) awaits in-flight requests in `Replica._perform_graceful_shutdown`
and only then calls the deployment's `__del__`. `install()`, called in a replica's constructor,
wraps that private method (in this process only) to call `begin` on the `drain` attribute of
the replica's object first. tests/e2e/test_serve_run.py fails if the pinned Ray changes it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from actors.failover import Draining

__all__ = ["Drain", "DrainedStream", "Draining", "install"]

# a child of Serve's logger: its handlers and LoggingConfig apply in a replica
log = logging.getLogger(f"ray.serve.{__name__}")

# both deployments' defaults (deploy/serve.yaml states them): seconds that requests in flight
# may run once a replica starts stopping, and how often Serve's replica looks whether they have
GRACE_S, WAIT_LOOP_S = 30.0, 0.5
ENDING_MARGIN_S = 1.0        # streams end this long before Serve's kill (at most half the grace)
POLL_S = 0.25                # how often a waiting stream looks whether its drain has begun


class Drain:
    """Whether this replica is draining, and until when its requests may run. `begin` may be
    called from another thread (Serve's replica loop) than the requests' event loop: only
    plain attributes are shared, and streams look at them every POLL_S at least."""

    def __init__(self) -> None:
        self.deadline: float | None = None       # time.monotonic() when in-flight ones end

    def begin(self, grace_s: float) -> None:
        """Start draining: refuse new requests now; end those in flight `grace_s` (seconds)
        less the ending margin from now. A second call changes nothing."""
        if self.deadline is None:
            run_s = max(0.0, grace_s - min(ENDING_MARGIN_S, grace_s / 2))
            self.deadline = time.monotonic() + run_s
            log.info("draining: new requests are refused; requests in flight may run %.1f s",
                     run_s)

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def check(self) -> None:
        """Raises Draining once draining has begun (a new request is refused)."""
        if self.draining:
            raise Draining()

    def wait_s(self) -> float:
        """How long a stream may wait for its next chunk before looking again (seconds)."""
        if self.deadline is None:
            return POLL_S
        return max(0.0, min(POLL_S, self.deadline - time.monotonic()))


class DrainedStream:
    """An async iterator of `stream`'s items until `drain` expires; then the item awaited is
    abandoned (which aborts an async generator's request), `stream.cancel()` is called if it
    has one (a Serve response: cancels the engine call), and Draining is raised."""

    def __init__(self, stream, drain: Drain):
        self._stream, self._drain = stream, drain
        self._pending: asyncio.Future | None = None     # the item being awaited

    def __aiter__(self) -> DrainedStream:
        return self

    async def __anext__(self):
        if self._drain.expired():
            self._end()
        self._pending = pending = asyncio.ensure_future(self._stream.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self._drain.wait_s())
                if done:
                    return pending.result()
                if self._drain.expired():
                    self._end()
        finally:
            pending.cancel()                     # no-op once done
            pending.add_done_callback(_retrieve)     # an abandoned item's error is nobody's

    def _end(self):
        self.cancel()
        log.info("draining: a request in flight ended at the end of the grace period")
        raise Draining("the server shut down before the request finished; retry it")

    def cancel(self) -> None:
        """Cancel the underlying stream (the client went away, or the grace is over)."""
        cancel = getattr(self._stream, "cancel", None)
        if cancel is not None:
            cancel()

    async def aclose(self) -> None:
        """Close the underlying stream if it is an async generator, once an abandoned item's
        task has ended (its `finally` runs now, not when it is garbage-collected: the engine's
        aborts the request)."""
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
            await asyncio.wait({self._pending})
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _retrieve(item: asyncio.Future) -> None:
    """Mark an abandoned item's exception retrieved: a stream ended by its client, its caller
    or the grace is no error (asyncio would log "Task exception was never retrieved")."""
    if not item.cancelled():
        item.exception()


def install() -> None:
    """Make this process's Serve replica call `begin(graceful_shutdown_timeout_s)` on its
    object's `drain` (a Drain) when its graceful shutdown starts (idempotent; the module doc)."""
    from ray.serve import context
    from ray.serve._private.replica import Replica

    original = Replica._perform_graceful_shutdown
    if getattr(original, "begins_drain", False):
        return

    async def _perform_graceful_shutdown(self):
        replica = context._get_internal_replica_context()
        drain = getattr(getattr(replica, "servable_object", None), "drain", None)
        if isinstance(drain, Drain):
            drain.begin(self._deployment_config.graceful_shutdown_timeout_s)
        await original(self)

    _perform_graceful_shutdown.begins_drain = True
    Replica._perform_graceful_shutdown = _perform_graceful_shutdown
