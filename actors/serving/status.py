"""What a failed request answers and logs: one mapping from an exception to its gRPC status code,
its HTTP status and the details a client may see, shared by the gRPC servicer
(actors/serving/grpc_servicer.py) and the HTTP app (actors/serving/http_app.py).

    InvalidRequest (and subclasses: ChatTemplateError...)   INVALID_ARGUMENT / 400, its message
    Unauthenticated (an API key is set: actors/serving/auth.py)      UNAUTHENTICATED / 401
    QueueFull (max_waiting), Serve's BackPressureError       RESOURCE_EXHAUSTED / 429
    EngineUnavailable (no engine took a request back
    within the failover bound: actors/failover.py),
    DeploymentUnavailableError, RayActorError                UNAVAILABLE / 503
    Draining (the replica shuts down: draining.py)           UNAVAILABLE / 503, its message
    anything else (other ValueErrors too: config, checkpoint,
    torch; ExpertCallError...)                               INTERNAL / 500, no internal text
Ray wraps an exception raised in another actor in RayTaskError (nested once per hop), and
`as_instanceof_cause()` makes it an instance of the cause's class as well: the cause is
unwrapped first, so a wrapped torch ValueError is INTERNAL.

Logging (`log_failure`): a failed request writes one line in its own protocol's words
("request answered INVALID_ARGUMENT: ..." over gRPC, "request answered 400: ..." over HTTP):
INFO for a client's error, ERROR for INTERNAL (its traceback at DEBUG), never a traceback at
INFO. A request that succeeds writes nothing here: Serve's proxy writes its one access line.
"""
from __future__ import annotations

import logging

import grpc
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from actors.failover import EngineUnavailable, unwrap
from actors.serving.auth import Unauthenticated
from actors.serving.draining import Draining
from model.errors import InvalidRequest, QueueFull

# a child of Serve's logger: its handlers (replica log files, the console of `serve run`) and
# its LoggingConfig apply; a plain module logger has no handler in a Serve process
log = logging.getLogger(f"ray.serve.{__name__}")

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.INTERNAL: 500}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(gRPC status code, details for the client) of an error; see the module docstring.
    Only request validation and authentication send their own text."""
    cause = unwrap(error)
    if isinstance(cause, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause)
    if isinstance(cause, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(cause)
    if isinstance(cause, (QueueFull, BackPressureError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests are waiting; try again later"
    if isinstance(cause, Draining):
        return grpc.StatusCode.UNAVAILABLE, str(cause)
    if isinstance(cause, (DeploymentUnavailableError, RayActorError, EngineUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, "the engine is starting or restarting; try again"
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def http_status_of(error: BaseException) -> tuple[int, str]:
    """(HTTP status, details for the client) of an error: `status_of` in HTTP's words."""
    code, details = status_of(error)
    return HTTP_STATUS[code], details


def log_failure(error: BaseException, answered: str | int) -> None:
    """One line for a failed request, `answered` being its status as the client saw it (a gRPC
    code's name or an HTTP status): INFO for a client's error, ERROR for an internal one (its
    traceback at DEBUG)."""
    cause = unwrap(error)
    if status_of(cause)[0] == grpc.StatusCode.INTERNAL:
        log.error("request failed (%s): %s: %s", answered, type(cause).__name__,
                  first_line(cause))
        log.debug("request failed", exc_info=error)
    else:
        log_refusal(answered, first_line(cause))


def log_refusal(answered: str | int, message: str) -> None:
    """The INFO line of a request refused for a client's error (bad field, key, queue full)."""
    log.info("request answered %s: %s", answered, message)


def first_line(error: BaseException) -> str:
    """The first line of an error's text ("" for none): a log line never spans lines."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
