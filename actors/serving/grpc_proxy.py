"""Three fixes to Serve's gRPC proxy (Ray 2.60), installed in its process: a gateway replica's
death as UNAVAILABLE, no traceback for a client that went away, and a client that went away
always cancels its call.

Serve's proxy answers a call whose replica died (RayActorError: killed, OOM, node lost) with
INTERNAL (ray/serve/_private/grpc_util.py, `get_grpc_response_status`, Ray 2.60), which clients
and load balancers treat as a server bug and do not retry. A replica gone is what UNAVAILABLE
means ("most likely a transient condition, which can be corrected by retrying with a backoff":
https://grpc.github.io/grpc/core/md_doc_statuscodes.html), and a retried call reaches a live
replica. Our gateway never lets an error of its own reach the proxy (its gRPC servicer,
actors/serving/grpc_servicer.py, sets every status itself), so a RayActorError there is the
gateway replica itself.

When a client cancels a call or its deadline passes, the proxy cancels the request, and Serve
reports it as a server error in two ways: a task of its own later ends with
RequestCancelledError that nothing retrieves (asyncio prints "Task exception was never
retrieved" and a traceback), and a stream closed mid-way raises GeneratorExit inside the proxy's
`send_request_to_replica`, whose `except BaseException` logs "Request failed due to unexpected
error" with a traceback, then yields a status from the closed generator ("async generator
ignored GeneratorExit", never retrieved either). A client going away is not a server error (at
most one quiet line, issue 10): GeneratorExit maps to CANCELLED without a log line, and those two
unretrieved-task reports go to DEBUG; every other report goes on as before.

A third fault, of the same kind (the client went away, the proxy mishandles it): the proxy
cancels the replica's call only when the cancellation lands while it awaits the replica's next
message (ProxyResponseGenerator.__anext__). When it lands while the proxy is writing a message
to the client (a slow reader, HTTP/2 flow control), the proxy's generator is closed at its
`yield` instead and the replica's call runs on: the engine generates up to `max_tokens` for
nobody and holds its sequence slot and KV blocks meanwhile. `send_request_to_replica` is
wrapped so that a stream ended before its last message cancels the replica's call.

A fourth, of a client's fault reported as the server's: a request message that does not parse
fails in gRPC's deserializer, in the proxy, before any handler runs, and gRPC answers UNKNOWN
"Unexpected <class 'google.protobuf.message.DecodeError'>: ..." and logs a traceback. Such a
request is answered INVALID_ARGUMENT naming the message type it should be (our API's, no
internals), with one INFO line, on every unary-request method the proxy serves (Generate,
GenerateStream, ModelInfo, the health service's Check and Watch).

Serve has no hook for any of these, but it imports and calls each `grpc_servicer_functions`
entry in the proxy process when it starts its gRPC server (on the proxy's event loop, after it
set its loop exception handler): `add_retryable_status_to_server` is listed there FIRST
(deploy/app.py: GRPC_SERVICER_FUNCTIONS), wraps the proxy's status mapping, the loop's exception
handler, `gRPCProxy.send_request_to_replica` and, for the servicers registered after it, the
request deserializer of each method. It relies on private names of the pinned Ray;
tests/e2e/test_gateway_death.py, tests/e2e/test_grpc.py and tests/e2e/test_grpc_errors.py fail
if they change. The port's receive limit and keepalive policy are set by an earlier hook
(actors/serving/grpc_port.py); this one warns when that one did not run.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.message import DecodeError
from ray.exceptions import RayActorError
from ray.serve.exceptions import RequestCancelledError

from actors.failover import unwrap
from actors.serving import grpc_port
from actors.serving.caller import stamp_requests

log = logging.getLogger(f"ray.serve.{__name__}")

REPLICA_DIED = "the server replica handling this call died; retry it"
CLOSED_GENERATOR = "async generator ignored GeneratorExit"   # CPython's message


def add_retryable_status_to_server(servicer, server) -> None:
    """A `grpc_servicer_functions` entry, listed first: adds no service; makes the proxy answer
    a call whose replica died with UNAVAILABLE instead of INTERNAL, quiets cancellations,
    cancels the replica call of a stream closed early and answers a request that does not
    parse with INVALID_ARGUMENT (idempotent)."""
    from ray.serve._private import grpc_util, proxy
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
    _cancel_replica_calls_of_closed_streams(proxy.gRPCProxy)
    _refuse_unparseable_requests(grpc_util.gRPCGenericServer)
    stamp_requests()            # replicas cancel a call whose proxy died (actors/serving/caller.py)
    if not grpc_port.installed():
        log.warning("the gRPC port reads request messages of up to Serve's 2 GiB before "
                    "authentication and refuses clients' keepalive pings: start Serve with "
                    "deploy/app.py's SERVE_CONTROLLER_OPTIONS (actors/serving/grpc_port.py)")


class _RecordingHandle:
    """A DeploymentHandle that remembers the responses of its `.remote` calls."""

    def __init__(self, handle):
        self._handle, self.responses = handle, []

    def remote(self, *args, **kwargs):
        response = self._handle.remote(*args, **kwargs)
        self.responses.append(response)
        return response

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _cancel_replica_calls_of_closed_streams(proxy_cls) -> None:
    """Wrap `proxy_cls.send_request_to_replica` (an async generator): when it is closed before
    its end, the replica calls it made are cancelled (DeploymentResponseGenerator.cancel)."""
    original = proxy_cls.send_request_to_replica

    async def send_request_to_replica(self, request_id, internal_request_id, handle,
                                      proxy_request, app_is_cross_language=False):
        calls = _RecordingHandle(handle)
        stream = original(self, request_id=request_id, internal_request_id=internal_request_id,
                          handle=calls, proxy_request=proxy_request,
                          app_is_cross_language=app_is_cross_language)
        ended = False
        try:
            async for message in stream:
                yield message
            ended = True
        finally:
            if not ended:
                for response in calls.responses:
                    try:
                        response.cancel()
                    except Exception as e:  # noqa: BLE001 - best effort, as Serve's own
                        log.debug("request %s: cancelling its replica call: %r", request_id, e)
                log.debug("request %s: stream closed early; its replica call is cancelled",
                          request_id)
                await stream.aclose()       # Serve's generator, closed in its own task, yields
                # its status after GeneratorExit: that report is quieted above

    proxy_cls.send_request_to_replica = send_request_to_replica


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


class _Unparseable:
    """What a tolerant deserializer returns for bytes that do not parse: the full name of the
    message type they should be, and the parser's error (for the log line only)."""

    def __init__(self, type_name: str, error: DecodeError):
        self.type_name, self.error = type_name, error


def _tolerant(deserializer):
    """`deserializer` (a message class's FromString) returning an _Unparseable for bytes that
    do not parse, instead of raising DecodeError."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "request"

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as e:
            return _Unparseable(type_name, e)
    return deserialize


def _refuse(method: str, request: _Unparseable, context) -> None:
    log.info("%s: the request message does not parse (%s); answered INVALID_ARGUMENT", method,
             request.error)
    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
    context.set_details(f"the request message does not parse as a {request.type_name}")


def _checked(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` (one unary-request method of the proxy's server) answering an unparseable
    request INVALID_ARGUMENT; a parsed one goes to its behaviour unchanged."""
    unary_unary, unary_stream = handler.unary_unary, handler.unary_stream

    async def checked_unary_unary(request, context):
        if isinstance(request, _Unparseable):
            _refuse(method, request, context)
            return b""                  # as Serve's own refusals: the status says it all
        return await unary_unary(request, context)

    async def checked_unary_stream(request, context):
        if isinstance(request, _Unparseable):
            _refuse(method, request, context)
            return
        stream = unary_stream(request, context)
        try:
            async for message in stream:
                yield message
        finally:
            await stream.aclose()       # closed with this one, as if it were this one

    return handler._replace(request_deserializer=_tolerant(handler.request_deserializer),
                            unary_unary=checked_unary_unary, unary_stream=checked_unary_stream)


def _refuse_unparseable_requests(server_cls) -> None:
    """Wrap `server_cls._override_method_handler` (Serve's gRPCGenericServer: it routes each
    method registered after this to the proxy) so that methods with a single request message
    answer one that does not parse with INVALID_ARGUMENT."""
    original = server_cls._override_method_handler

    def _override_method_handler(self, service_method, method_handler):
        handler = original(self, service_method, method_handler)
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        return _checked(service_method, handler)

    server_cls._override_method_handler = _override_method_handler
