"""Work for a caller that is gone stops at once, whichever hop dies: SIGKILL Serve's proxy (the
one ProxyActor process serves gRPC and HTTP) or the gateway replica during long calls of every
kind at once (gRPC and HTTP, unary and streaming), and the engine drops every one of them within
a few seconds (actors/serving/caller.py), where it would otherwise generate their 4,000 tokens
for nobody (~50 s on two loaded cores). One kill per hop: Serve takes ~30 s to restart a proxy.
A client that goes away from a stream of n choices, one of them finished, frees all of them.

Serve restarts what was killed; each test waits for it to answer again, and leaves the shared
application idle."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from ray import serve

from protos import generator_pb2 as pb
from tests.choices import ONE_ENDS_EARLY
from tests.e2e.serve_logs import serve_logs_since

APP = "mixtral-ep"              # the shared app's (tests/e2e/conftest.py: TINY_APP)
MODEL = "tiny"                  # and its model id (TINY_MODEL)
MAX_TOKENS = 4000               # the tiny model's context is 4,096
GATEWAY_LOGS = f"replica_{APP}_Gateway_*.log"   # Serve's log files of the gateway replicas
CANCEL_S = 10.0                 # the engine holds the requests at most this long after the kill
RESTART_S = 120.0               # Serve answers again within this long after the kill


@pytest.fixture(scope="module")
def server(tiny_app):
    assert (tiny_app.name, tiny_app.model) == (APP, MODEL)
    return tiny_app.stub


def engine_info():
    return serve.get_deployment_handle("EngineServer", APP).info.remote().result(timeout_s=30)


def wait_for(condition, what: str, timeout_s: float) -> float:
    """Seconds until `condition()` held; fails naming `what` after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, what
        time.sleep(0.25)
    return time.monotonic() - start


def idle() -> bool:
    info = engine_info()
    return info.tracked_requests == 0 and info.free_blocks == info.total_blocks


def until_idle(calls: str) -> tuple[float, str]:
    """Wait at most CANCEL_S for the engine to hold no request and every KV block to be free:
    -> (seconds it took, or CANCEL_S; what it still held then, in words, naming `calls`)."""
    start = time.monotonic()
    while not idle() and time.monotonic() - start < CANCEL_S:
        time.sleep(0.25)
    took, info = time.monotonic() - start, engine_info()
    return took, (f"{info.tracked_requests} of the {calls} and "
                  f"{info.total_blocks - info.free_blocks} KV blocks")


def grpc_call(stub, stream: bool) -> None:
    request = pb.GenerateRequest(prompt="Once", max_tokens=MAX_TOKENS, temperature=0.0)
    try:
        if stream:
            for _ in stub.GenerateStream(request, timeout=300):
                pass
        else:
            stub.Generate(request, timeout=300)
    except grpc.RpcError:
        pass                                    # the hop died: the call fails, as it should


def http_call(port: int, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        conn.getresponse().read()
    except (http.client.HTTPException, OSError):
        pass
    finally:
        conn.close()


def every_call_kind(stub, http_port: int) -> dict[str, Callable[[], None]]:
    """One long call of each kind, by name: gRPC and HTTP, streaming and unary."""
    return {"gRPC stream": lambda: grpc_call(stub, True),
            "gRPC unary": lambda: grpc_call(stub, False),
            "HTTP stream": lambda: http_call(http_port, True),
            "HTTP unary": lambda: http_call(http_port, False)}


def listening(*ports: int) -> bool:
    """Whether every port accepts a TCP connection on 127.0.0.1."""
    try:
        for port in ports:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def serving_again(stub, http_port: int) -> bool:
    """Whether both of Serve's proxies answer a short request again."""
    try:
        stub.Generate(pb.GenerateRequest(prompt="Once", max_tokens=2), timeout=10)
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except (grpc.RpcError, http.client.HTTPException, OSError):
        return False


def wait_until_serving(stub, grpc_port: int, http_port: int) -> None:
    """Wait for Serve to answer on both ports again. The shared stub is first asked once both
    ports listen: each RPC it fails while its channel cannot connect lengthens the channel's
    reconnect backoff (1 s growing 1.6x), which would delay it by up to ~15 s after a ~30 s
    proxy restart; a channel whose connection just broke waits idle and connects at once."""
    wait_for(lambda: listening(grpc_port, http_port), "Serve's proxy listens again", RESTART_S)
    wait_for(lambda: serving_again(stub, http_port), "Serve serves again", RESTART_S)


def kill_mid_calls(victim: str, alive_actors, stub, grpc_port: int,
                   http_port: int) -> tuple[float, str]:
    """Start a long call of every kind, each in a thread, and SIGKILL the one actor of class
    `victim` once the engine generates for all of them; -> (seconds from the kill until the
    engine held no request and every KV block was free, or CANCEL_S; what it still held then,
    in words). Waits for Serve to serve again, and for the engine to be idle, before it
    returns or fails."""
    wait_for(idle, "the engine is idle before the test", 120)
    calls = every_call_kind(stub, http_port)
    threads = [threading.Thread(target=call, name=kind, daemon=True)
               for kind, call in calls.items()]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: engine_info().tracked_requests == len(calls),
                 f"all {len(calls)} calls ({', '.join(calls)}) reached the engine", 60)
        time.sleep(1.0)                                     # tokens are flowing
        [actor] = alive_actors(victim)
        os.kill(actor["Pid"], signal.SIGKILL)
        return until_idle(f"{len(calls)} calls ({', '.join(calls)})")
    finally:
        wait_until_serving(stub, grpc_port, http_port)
        wait_for(idle, "the engine is idle after the test", 120)
        for thread in threads:
            thread.join(timeout=10)


def test_a_dead_proxy_cancels_every_engine_call(server, alive_actors, grpc_port, http_port):
    """SIGKILL Serve's proxy (gRPC and HTTP are one ProxyActor) mid-call with a gRPC stream, a
    gRPC unary, an HTTP stream and an HTTP unary call in flight: the engine drops all four
    within seconds (today's Serve generates on to max_tokens for nobody), and the gateway logs
    no traceback for the HTTP calls the proxy carried (Serve's receive raised ActorDiedError)."""
    sizes, _ = serve_logs_since(files=GATEWAY_LOGS)
    took, held = kill_mid_calls("ProxyActor", alive_actors, server, grpc_port, http_port)
    assert took < CANCEL_S, f"the engine still held {held} {took:.1f} s after the proxy died"
    _, new = serve_logs_since(sizes, GATEWAY_LOGS)  # its HTTP calls ended as disconnects
    assert "Traceback" not in new and "Request failed" not in new, new[-3000:]


def test_a_dead_gateway_replica_cancels_every_engine_call(server, alive_actors, grpc_port,
                                                          http_port):
    """SIGKILL the gateway replica mid-call with a call of every kind in flight (the
    gateway's stream and unary calls, gRPC and HTTP): the engine replica's streams, whose
    caller died, are all cancelled within seconds."""
    took, held = kill_mid_calls(f"ServeReplica:{APP}:Gateway", alive_actors, server,
                                grpc_port, http_port)
    assert took < CANCEL_S, f"the engine still held {held} {took:.1f} s after the gateway died"


def grpc_choices(stub) -> Iterator[tuple[int, str]]:
    """(index, finish reason or "") per message of a ONE_ENDS_EARLY stream; leaving it
    cancels it."""
    call = stub.GenerateStream(pb.GenerateRequest(prompt="Once", max_tokens=MAX_TOKENS,
                                                  **ONE_ENDS_EARLY), timeout=300)
    try:
        for part in call:
            yield part.index, part.finish_reason
    finally:
        call.cancel()


def http_choices(port: int) -> Iterator[tuple[int, str]]:
    """(index, finish reason or "") per choice of each event of a ONE_ENDS_EARLY stream of
    /v1/completions; leaving it closes the connection."""
    body = {"model": MODEL, "prompt": "Once", "max_tokens": MAX_TOKENS, "stream": True,
            **ONE_ENDS_EARLY}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        for line in response:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[len(b"data: "):])["choices"]:
                    yield choice["index"], choice["finish_reason"] or ""
    finally:
        conn.close()


@pytest.mark.parametrize("protocol", ["gRPC", "HTTP"])
def test_a_client_leaving_n_choices_frees_every_one(server, http_port, protocol):
    """A client goes away from an n = 4 stream once every choice has streamed and one has
    finished (the others mid-way, one with 1,500+ tokens to go): the engine drops all of them
    and every KV block the choices held (the prompt's shared ones and each choice's own)."""
    wait_for(idle, "the engine is idle before the test", 120)
    chunks = grpc_choices(server) if protocol == "gRPC" else http_choices(http_port)
    seen, finished = set(), set()
    try:
        for index, reason in chunks:
            seen.add(index)
            if reason:
                finished.add(index)
            if len(seen) == ONE_ENDS_EARLY["n"] and finished:
                break
        info = engine_info()
        assert (info.tracked_requests, len(finished)) == (1, 1), (info, finished)
        assert info.free_blocks < info.total_blocks
    finally:
        chunks.close()                                  # the client goes away
    took, held = until_idle(f"1 {protocol} stream of n = 4")
    assert took < CANCEL_S, f"the engine still held {held} {took:.1f} s after the client left"
