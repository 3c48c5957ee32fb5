"""Work for a caller that is gone is cancelled, whichever hop dies.

Ray does not cancel an actor task when the process that called it dies, and Serve's replica does
not watch its caller: SIGKILL Serve's proxy (one ProxyActor process serves gRPC and HTTP) or a
gateway replica during a call, and the engine generated on to `max_tokens` for nobody, holding
a sequence slot and its KV blocks meanwhile. So each hop names its caller, an actor id, and the
callee watches it:

    client -> Serve proxy ──(ProxyActor's id)──▶ Gateway ──(Gateway's id)──▶ EngineServer

- proxy -> gateway: the proxy process stamps its actor id on every request it sends
  (`stamp_requests`, installed there by actors/serving/grpc_proxy.py): on a gRPC call's context
  (`caller_of(grpc_context)`) and on an HTTP request's ASGI scope (`CALLER_SCOPE_KEY`);
- gateway -> engine: the gateway passes its own id (`own_id()`) with each engine call
  (actors/serving/engine_client.py, actors/serving/engine_server.py).

The callee runs the call inside `cancel_if_gone(caller)`: one poll loop per caller and event
loop asks the GCS for the caller's state every POLL_S seconds while it has calls in flight, and
once the caller is not ALIVE (dead, or restarting: a restarted actor knows nothing of its old
calls) cancels their tasks. A cancelled gateway call cancels its engine call (Serve cancels a
cancelled request's handle calls, and the gateway cancels its stream); a cancelled engine call
aborts the request and frees its KV blocks. So a call outlives its caller by at most POLL_S plus
a GCS round trip per hop. A caller whose state cannot be read (the GCS is unreachable, an id
it does not know) is taken as alive: a call is never cancelled on a guess.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable

import ray

# a child of Serve's logger: its handlers and LoggingConfig apply in a replica
log = logging.getLogger(f"ray.serve.{__name__}")

POLL_S = 1.0                                 # how often a caller with calls in flight is checked
CALLER_ATTR = "mixtral_ep_caller"            # on Serve's gRPC context: the proxy's actor id
CALLER_SCOPE_KEY = "mixtral_ep.caller"       # in an HTTP request's ASGI scope: the same


def own_id() -> str | None:
    """This process's actor id (hex), None outside an actor (a driver, a unit test)."""
    try:
        return ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - no Ray here: no caller to name
        return None


def caller_of(grpc_context) -> str | None:
    """The proxy actor's id stamped on a gRPC call's context (Serve's RayServegRPCContext),
    None where none is (a test's context, a proxy without `stamp_requests`)."""
    return getattr(grpc_context, CALLER_ATTR, None)


def alive(actor_id: str) -> bool | None:
    """False once the GCS has actor `actor_id` in any state but ALIVE; None where it cannot
    say (no such actor, the GCS unreachable)."""
    try:
        entry = ray._private.state.actors(actor_id=actor_id)
    except Exception as e:  # noqa: BLE001 - unknown is not dead
        log.debug("could not read actor %s's state: %r", actor_id, e)
        return None
    return None if not entry else entry.get("State") == "ALIVE"


class Call:
    """One call in flight: `task` runs it now (an async generator's items may each be awaited
    by a task of their own: `watched` moves it), `gone` once its caller is."""

    def __init__(self, task: asyncio.Task):
        self.task, self.gone = task, False

    def cancel(self) -> None:
        self.gone = True
        self.task.cancel()


class CallerWatch:
    """The calls in flight on one event loop, by caller; see the module docstring.
    `is_alive(actor_id)` -> True / False / None (unknown), asked in a thread."""

    def __init__(self, poll_s: float = POLL_S,
                 is_alive: Callable[[str], bool | None] = alive):
        self._poll_s, self._is_alive = poll_s, is_alive
        self._calls: dict[str, set[Call]] = {}
        self._loops: dict[str, asyncio.Task] = {}

    @contextlib.asynccontextmanager
    async def cancel_if_gone(self, caller: str | None) -> AsyncIterator[Call | None]:
        """Run the body as a Call of the current task, cancelled if `caller` (an actor id)
        dies meanwhile; None: no caller to watch (the body gets None)."""
        task = asyncio.current_task()
        if caller is None or task is None:
            yield None
            return
        call = Call(task)
        self._calls.setdefault(caller, set()).add(call)
        if caller not in self._loops:
            self._loops[caller] = asyncio.create_task(self._watch(caller))
        try:
            yield call
        finally:
            calls = self._calls.get(caller)
            if calls is not None:
                calls.discard(call)

    async def _watch(self, caller: str) -> None:
        """Poll `caller` while it has calls; cancel them all once it is gone."""
        try:
            while self._calls.get(caller):
                await asyncio.sleep(self._poll_s)
                if self._calls.get(caller) and await asyncio.to_thread(
                        self._is_alive, caller) is False:
                    calls = self._calls.pop(caller)
                    log.info("the caller of %d call(s) (actor %s) is gone: cancelling them",
                             len(calls), caller)
                    for call in calls:
                        call.cancel()
        finally:
            self._loops.pop(caller, None)
            if not self._calls.get(caller):
                self._calls.pop(caller, None)


_watches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # event loop -> its watch


def cancel_if_gone(caller: str | None) -> contextlib.AbstractAsyncContextManager[Call | None]:
    """`async with cancel_if_gone(caller):` runs its body cancelled if actor `caller` dies
    meanwhile (this event loop's CallerWatch)."""
    loop = asyncio.get_running_loop()
    if loop not in _watches:
        _watches[loop] = CallerWatch()
    return _watches[loop].cancel_if_gone(caller)


async def watched(chunks: AsyncIterator, caller: str | None) -> AsyncIterator:
    """`chunks` passed on, ended with CancelledError (and `chunks` closed) if actor `caller`
    dies meanwhile: the task awaiting the next item is cancelled, whichever task that is (a
    consumer may await each item in a task of its own), or the next item is refused."""
    try:
        async with cancel_if_gone(caller) as call:
            while True:
                if call is not None:
                    if call.gone:
                        raise asyncio.CancelledError(f"caller {caller} is gone")
                    call.task = asyncio.current_task() or call.task
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def stamp_requests() -> None:
    """In Serve's proxy process: stamp this ProxyActor's id on every request it sends a
    replica, gRPC (`caller_of`) and HTTP (`CALLER_SCOPE_KEY`). Wraps private names of the
    pinned Ray (proxy_request_response.py, Ray 2.60); idempotent; tests/e2e/test_cancellation.py
    fails if they change."""
    from ray.serve._private import proxy_request_response as prr

    if getattr(prr.gRPCProxyRequest.setup_variables, "stamps_caller", False):
        return
    me = own_id()
    setup_variables = prr.gRPCProxyRequest.setup_variables
    serialized_replica_arg = prr.ASGIProxyRequest.serialized_replica_arg

    def stamped_setup_variables(self):
        setup_variables(self)
        setattr(self.ray_serve_grpc_context, CALLER_ATTR, me)

    def stamped_replica_arg(self, *args, **kwargs):
        self.scope[CALLER_SCOPE_KEY] = me
        return serialized_replica_arg(self, *args, **kwargs)

    stamped_setup_variables.stamps_caller = True
    prr.gRPCProxyRequest.setup_variables = stamped_setup_variables
    prr.ASGIProxyRequest.serialized_replica_arg = stamped_replica_arg
