"""A gateway replica's death as gRPC UNAVAILABLE, installed in Serve's gRPC proxy.

Serve's proxy answers a call whose replica died (RayActorError: killed, OOM, node lost) with
INTERNAL (ray/serve/_private/grpc_util.py, `get_grpc_response_status`, Ray 2.60), which clients
and load balancers treat as a server bug and do not retry. A replica gone is what UNAVAILABLE
means ("most likely a transient condition, which can be corrected by retrying with a backoff":
https://grpc.github.io/grpc/core/md_doc_statuscodes.html), and a retried call reaches a live
replica. Our gateway never lets an error of its own reach the proxy (actors/gateway.py sets
every status itself), so a RayActorError there is the gateway replica itself.

Serve has no hook for status mapping, but it imports and calls each `grpc_servicer_functions`
entry in the proxy process when it starts its gRPC server: `add_retryable_status_to_server`
is listed there (deploy/app.py: GRPC_SERVICER_FUNCTIONS) and wraps the proxy's mapping. It
relies on a private name of the pinned Ray; tests/e2e/test_gateway_death.py fails if that
changes.
"""
from __future__ import annotations

import logging

import grpc
from ray.exceptions import RayActorError

from actors.failover import unwrap

log = logging.getLogger(f"ray.serve.{__name__}")

REPLICA_DIED = "the server replica handling this call died; retry it"


def add_retryable_status_to_server(servicer, server) -> None:
    """A `grpc_servicer_functions` entry: adds no service; makes the proxy answer a call whose
    replica died with UNAVAILABLE instead of INTERNAL (idempotent)."""
    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    original = proxy.get_grpc_response_status
    if getattr(original, "replica_death_is_unavailable", False):
        return

    def get_grpc_response_status(exc, request_timeout_s, request_id):
        if isinstance(unwrap(exc), RayActorError):
            log.warning("request %s: its replica died (%s); answered UNAVAILABLE", request_id,
                        type(unwrap(exc)).__name__)
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True,
                                  message=REPLICA_DIED)
        return original(exc, request_timeout_s, request_id)

    get_grpc_response_status.replica_death_is_unavailable = True
    proxy.get_grpc_response_status = get_grpc_response_status
