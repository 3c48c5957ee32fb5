"""Two fixes to Serve's gRPC proxy (Ray 2.60), installed in its process: a gateway replica's
death as UNAVAILABLE, and no traceback for a client that went away.

Serve's proxy answers a call whose replica died (RayActorError: killed, OOM, node lost) with
INTERNAL (ray/serve/_private/grpc_util.py, `get_grpc_response_status`, Ray 2.60), which clients
and load balancers treat as a server bug and do not retry. A replica gone is what UNAVAILABLE
means ("most likely a transient condition, which can be corrected by retrying with a backoff":
https://grpc.github.io/grpc/core/md_doc_statuscodes.html), and a retried call reaches a live
replica. Our gateway never lets an error of its own reach the proxy (actors/gateway.py sets
every status itself), so a RayActorError there is the gateway replica itself.

When a client cancels a call or its deadline passes, the proxy cancels the request, and Serve
reports it as a server error in two ways: a task of its own later ends with
RequestCancelledError that nothing retrieves (asyncio prints "Task exception was never
retrieved" and a traceback), and a stream closed mid-way raises GeneratorExit inside the proxy's
`send_request_to_replica`, whose `except BaseException` logs "Request failed due to unexpected
error" with a traceback, then yields a status from the closed generator ("async generator
ignored GeneratorExit", never retrieved either). A client going away is not a server error (at
most one quiet line, issue 10): GeneratorExit maps to CANCELLED without a log line, and those two
unretrieved-task reports go to DEBUG; every other report goes on as before.

Serve has no hook for either, but it imports and calls each `grpc_servicer_functions` entry in
the proxy process when it starts its gRPC server (on the proxy's event loop, after it set its
loop exception handler): `add_retryable_status_to_server` is listed there (deploy/app.py:
GRPC_SERVICER_FUNCTIONS), wraps the proxy's status mapping and the loop's exception handler. It
relies on a private name of the pinned Ray; tests/e2e/test_gateway_death.py and
tests/e2e/test_grpc.py fail if that changes.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from ray.exceptions import RayActorError
from ray.serve.exceptions import RequestCancelledError

from actors.failover import unwrap

log = logging.getLogger(f"ray.serve.{__name__}")

REPLICA_DIED = "the server replica handling this call died; retry it"
CLOSED_GENERATOR = "async generator ignored GeneratorExit"   # CPython's message


def add_retryable_status_to_server(servicer, server) -> None:
    """A `grpc_servicer_functions` entry: adds no service; makes the proxy answer a call whose
    replica died with UNAVAILABLE instead of INTERNAL (idempotent)."""
    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    original = proxy.get_grpc_response_status
    if getattr(original, "replica_death_is_unavailable", False):
        return

    def get_grpc_response_status(exc, request_timeout_s, request_id):
        if isinstance(exc, GeneratorExit):      # the client closed the stream
            return ResponseStatus(code=grpc.StatusCode.CANCELLED, is_error=True,
                                  message="the client cancelled the call")
        if isinstance(unwrap(exc), RayActorError):
            log.warning("request %s: its replica died (%s); answered UNAVAILABLE", request_id,
                        type(unwrap(exc)).__name__)
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True,
                                  message=REPLICA_DIED)
        return original(exc, request_timeout_s, request_id)

    get_grpc_response_status.replica_death_is_unavailable = True
    proxy.get_grpc_response_status = get_grpc_response_status
    _quiet_cancellations(asyncio.get_event_loop())


def _quiet_cancellations(loop: asyncio.AbstractEventLoop) -> None:
    """Report an unretrieved RequestCancelledError at DEBUG; pass anything else on."""
    previous = loop.get_exception_handler()

    def handler(loop, context):
        exc = context.get("exception")
        if isinstance(exc, RequestCancelledError) or (
                isinstance(exc, RuntimeError) and str(exc) == CLOSED_GENERATOR):
            log.debug("a cancelled request's task ended: %r", exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
