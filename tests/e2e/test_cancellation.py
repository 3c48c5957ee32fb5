"""Work for a caller that is gone stops at once, whichever hop dies: SIGKILL Serve's proxy (the
one ProxyActor process serves gRPC and HTTP) or the gateway replica during a long call, unary or
streaming, and the engine drops the request within a few seconds (actors/serving/caller.py),
where it would otherwise generate its 4,000 tokens for nobody (~50 s on two loaded cores).

Serve restarts what was killed; each test waits for it to answer again, and leaves the shared
application idle."""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import grpc
import pytest
from ray import serve

from protos import generator_pb2 as pb

APP = "mixtral-ep"              # the shared app's (tests/e2e/conftest.py: TINY_APP)
MODEL = "tiny"                  # and its model id (TINY_MODEL)
MAX_TOKENS = 4000               # the tiny model's context is 4,096
CANCEL_S = 10.0                 # the engine holds the request at most this long after the kill


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


def kill_mid_call(call, victim: str, alive_actors, server, http_port) -> float:
    """Start `call()` in a thread, SIGKILL the one actor of class `victim` once the engine
    generates for it; -> seconds from the kill until the engine holds no request. Waits for
    Serve to serve again, and for the engine to be idle, before it returns or fails."""
    wait_for(idle, "the engine is idle before the test", 120)
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    try:
        wait_for(lambda: engine_info().tracked_requests == 1, "the call reached the engine", 60)
        time.sleep(1.0)                                     # tokens are flowing
        [actor] = alive_actors(victim)
        os.kill(actor["Pid"], signal.SIGKILL)
        start = time.monotonic()
        while engine_info().tracked_requests and time.monotonic() - start < CANCEL_S:
            time.sleep(0.25)
        return time.monotonic() - start
    finally:
        wait_for(lambda: serving_again(server, http_port), "Serve serves again", 120)
        wait_for(idle, "the engine is idle after the test", 120)
        thread.join(timeout=10)


@pytest.mark.parametrize("protocol,stream", [("grpc", True), ("grpc", False),
                                             ("http", True), ("http", False)])
def test_a_dead_proxy_cancels_the_engine_call(server, alive_actors, http_port, protocol, stream):
    """SIGKILL Serve's proxy (gRPC and HTTP are one ProxyActor) mid-call: the engine call is
    cancelled within seconds (today's Serve generates on to max_tokens for nobody)."""
    call = ((lambda: grpc_call(server, stream)) if protocol == "grpc"
            else (lambda: http_call(http_port, stream)))
    took = kill_mid_call(call, "ProxyActor", alive_actors, server, http_port)
    assert took < CANCEL_S, f"the engine still generated {took:.1f} s after the proxy died"


@pytest.mark.parametrize("stream", [True, False])
def test_a_dead_gateway_replica_cancels_the_engine_call(server, alive_actors, http_port, stream):
    """SIGKILL the gateway replica mid-call: the engine replica's stream, whose caller died,
    is cancelled within seconds."""
    took = kill_mid_call(lambda: grpc_call(server, stream), f"ServeReplica:{APP}:Gateway",
                         alive_actors, server, http_port)
    assert took < CANCEL_S, f"the engine still generated {took:.1f} s after the gateway died"
