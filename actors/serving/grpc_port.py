"""The gRPC port's transport limits, set in Serve's proxy process before its gRPC server exists:
how large a request message it reads, and how often clients may send keepalive pings.

Serve's proxy (Ray 2.60) builds its gRPC server with `DEFAULT_GRPC_SERVER_OPTIONS`
(ray/serve/_private/constants.py: messages up to 2 GiB each way) and reads a message whole before
any handler runs, so a client without the API key could make the proxy, then the gateway, hold
gigabytes before it is answered UNAUTHENTICATED. The limit below makes gRPC itself refuse a larger
message with RESOURCE_EXHAUSTED, before our code (auth included) sees it. gRPC's default ping
policy answers a client that pings more often than every 5 minutes while no data flows (a unary
call waiting for its reply) with GOAWAY "too_many_pings" after two strikes: a client with
`grpc.keepalive_time_ms=5000` loses a 20 s call. The server here accepts pings every
`MIN_PING_INTERVAL_ENV` ms, with or without calls in flight.

Those options must exist when Serve creates the server, which it does before it calls any
`grpc_servicer_functions` entry (too late for channel options). Serve calls one hook earlier in
the proxy process: the HTTP proxy callback (env `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`,
called in `ProxyActor.__init__`, which must return HTTP middlewares). `set_grpc_server_options`
is that callback: it adds no middleware and puts these options into Serve's defaults. The env
reaches every proxy through the Serve controller's runtime_env (proxies are its child actors
and inherit it): deploy/app.py SERVE_CONTROLLER_OPTIONS, which the Serve configs in deploy/
list as `controller_options`. The limits themselves are read from the proxy's environment: set
them there too, or in the Ray nodes' environment.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(f"ray.serve.{__name__}")

MAX_RECEIVE_ENV = "MIXTRAL_EP_GRPC_MAX_RECEIVE_BYTES"
MIN_PING_INTERVAL_ENV = "MIXTRAL_EP_GRPC_MIN_PING_INTERVAL_MS"
# The largest legitimate request is a context-length prompt: every token is at most 25 bytes of
# UTF-8 text in Mixtral's vocabulary, so 32,768 tokens are at most 0.8 MiB; 4 MiB holds a
# 131,072-token context at 32 bytes a token (and is gRPC's own default receive limit).
DEFAULT_MAX_RECEIVE_BYTES = 4 * 2**20
MAX_RECEIVE_RANGE = (1024, 2**31 - 1)           # bytes; gRPC's limit is a signed 32-bit int
# Clients may ping every 5 s (keepalive_time_ms=5000) or less often; the server's floor is one
# second lower, so a 5 s client's timer slack never counts as a strike.
DEFAULT_MIN_PING_INTERVAL_MS = 4000
MIN_PING_INTERVAL_RANGE = (0, 2**31 - 1)        # ms; 0: any interval

_installed = False      # set_grpc_server_options ran in this process


def _int_env(env: Mapping[str, str], name: str, default: int, bounds: tuple[int, int]) -> int:
    """The integer in env[name], else `default`; ValueError naming the variable and its range."""
    text = env.get(name, "").strip()
    if not text:
        return default
    low, high = bounds
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {text!r}")
    return value


def server_options(env: Mapping[str, str] = os.environ) -> list[tuple[str, int]]:
    """The gRPC server options for the port, from `env` (MAX_RECEIVE_ENV in bytes,
    MIN_PING_INTERVAL_ENV in ms, each defaulted when unset); ValueError names a bad one."""
    max_receive = _int_env(env, MAX_RECEIVE_ENV, DEFAULT_MAX_RECEIVE_BYTES, MAX_RECEIVE_RANGE)
    min_ping_ms = _int_env(env, MIN_PING_INTERVAL_ENV, DEFAULT_MIN_PING_INTERVAL_MS,
                           MIN_PING_INTERVAL_RANGE)
    return [("grpc.max_receive_message_length", max_receive),
            ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
            ("grpc.keepalive_permit_without_calls", 1)]


def with_options(defaults: list[tuple], options: list[tuple]) -> list[tuple]:
    """`defaults` with each key of `options` replaced by (or added as) its value there."""
    keys = {key for key, _ in options}
    return [(k, v) for k, v in defaults if k not in keys] + list(options)


def set_grpc_server_options() -> list:
    """Serve's HTTP proxy callback (the module doc): the gRPC server this proxy starts next
    takes `server_options()`. Returns [] (no HTTP middleware); ValueError names a bad env
    value (the proxy then fails to start, and Serve reports it)."""
    global _installed
    from ray.serve._private import grpc_util

    options = server_options()
    grpc_util.DEFAULT_GRPC_SERVER_OPTIONS = with_options(grpc_util.DEFAULT_GRPC_SERVER_OPTIONS,
                                                         options)
    _installed = True
    log.info("gRPC port: %s", ", ".join(f"{k}={v}" for k, v in options))
    return []


def installed() -> bool:
    """Whether `set_grpc_server_options` ran in this process."""
    return _installed
