"""The gRPC port as a client meets it, on the shared tiny app: its receive limit (gRPC refuses a
larger message before our code, the API key check included, sees it), its keepalive policy, and
its answer to bytes that do not parse (actors/serving/grpc_port.py, grpc_proxy.py)."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import ray

from actors.serving.grpc_port import DEFAULT_MAX_RECEIVE_BYTES
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

MiB = 2**20


@pytest.fixture(scope="module")
def address(tiny_app, grpc_port) -> str:
    return f"127.0.0.1:{grpc_port}"


def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def peak_rss_since_reset(pid: int, reset: bool = False) -> int:
    """The process's peak resident memory in bytes (Linux VmHWM); `reset` restarts it from
    the current resident size first (proc(5): clear_refs 5)."""
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    status = Path(f"/proc/{pid}/status").read_text()
    [line] = [s for s in status.splitlines() if s.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


def test_a_message_over_the_receive_limit_is_refused_before_it_is_read(address, alive_actors):
    """A 64 MiB Generate without the API key: RESOURCE_EXHAUSTED within seconds, and Serve's
    proxy never holds it (its peak resident memory grows by less than half of it); a normal call
    on the same channel runs after. A request of a context-length prompt's scale (1 MiB) gets
    through to the gateway, which answers it."""
    [proxy] = alive_actors("ProxyActor")
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        before = peak_rss_since_reset(proxy["Pid"], reset=True)
        started = time.monotonic()
        code, details = code_of(lambda: stub.Generate(
            pb.GenerateRequest(prompt="a" * (64 * MiB), max_tokens=1), timeout=60))
        took = time.monotonic() - started
        grown = peak_rss_since_reset(proxy["Pid"]) - before
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        assert f"vs. {DEFAULT_MAX_RECEIVE_BYTES}" in details, details    # gRPC's own words
        assert took < 10, took
        assert grown < 32 * MiB, f"the proxy grew by {grown / MiB:.0f} MiB"
        code, details = code_of(lambda: stub.Generate(
            pb.GenerateRequest(prompt="word " * (MiB // 5), max_tokens=1), timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "context length" in details, details
        reply = stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2), timeout=60)
        assert reply.usage.completion_tokens == 2


# bytes that parse as no message of the method's type: a string field holding bad UTF-8 (the
# issue's), and a length-delimited field cut short
BAD_UTF8, TRUNCATED = bytes.fromhex("0a02fffe1802"), bytes.fromhex("0a05ab")
UNPARSEABLE = [
    ("/mixtral_ep.v1.Generator/Generate", False, BAD_UTF8, "mixtral_ep.v1.GenerateRequest"),
    ("/mixtral_ep.v1.Generator/GenerateStream", True, BAD_UTF8, "mixtral_ep.v1.GenerateRequest"),
    ("/mixtral_ep.v1.Generator/Generate", False, TRUNCATED, "mixtral_ep.v1.GenerateRequest"),
    ("/mixtral_ep.v1.Generator/ModelInfo", False, TRUNCATED, "mixtral_ep.v1.ModelInfoRequest"),
    ("/grpc.health.v1.Health/Check", False, BAD_UTF8, "grpc.health.v1.HealthCheckRequest"),
    ("/grpc.health.v1.Health/Watch", True, TRUNCATED, "grpc.health.v1.HealthCheckRequest")]


def test_a_request_that_does_not_parse_is_invalid_argument_and_one_info_line(address):
    """Raw bytes that are no valid request message, to each unary-request method: answered
    INVALID_ARGUMENT naming the message type (no parser internals), one INFO line each in
    Serve's logs, no traceback and no ERROR line."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    sizes = {f: f.stat().st_size for f in logs.glob("*.log")}
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    with grpc.insecure_channel(address) as channel:
        for method, streams, data, type_name in UNPARSEABLE:
            if streams:
                call = channel.unary_stream(method, **raw)
                code, details = code_of(lambda c=call, d=data: list(c(d, timeout=30)))
            else:
                call = channel.unary_unary(method, **raw)
                code, details = code_of(lambda c=call, d=data: c(d, timeout=30))
            assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                                       f"the request message does not parse as a {type_name}"
                                       ), (method, code, details)
    time.sleep(3)                               # Serve writes its log files asynchronously
    new = "".join(f.read_bytes()[sizes.get(f, 0):].decode(errors="replace")
                  for f in sorted(logs.glob("*.log")))
    assert "Traceback" not in new and " ERROR " not in new, new[-3000:]
    assert new.count("the request message does not parse") == len(UNPARSEABLE), new[-3000:]


def test_a_client_pinging_every_5_s_keeps_its_connection(address):
    """A client that pings every 5 s (keepalive_time_ms=5000, with or without calls or data).
    gRPC's default server policy counts every ping after the first as a strike while the server
    sends no data (no call, or a unary call waiting for its reply) and sends GOAWAY
    too_many_pings on the third: at ~20 s, the connection drops, and a call in flight fails
    UNAVAILABLE. The port accepts such pings (one setting, min_ping_interval_without_data_ms,
    rules both cases): 23 s idle, then a call of 1,000 tokens, on one connection."""
    pinging = [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 10000),
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    states = []
    with grpc.insecure_channel(address, options=pinging) as channel:
        channel.subscribe(states.append, try_to_connect=True)
        grpc.channel_ready_future(channel).result(timeout=30)
        time.sleep(23)                          # idle: pings at 5, 10, 15 and 20 s
        reply = pb_grpc.GeneratorStub(channel).Generate(
            pb.GenerateRequest(prompt="Once", max_tokens=1000, temperature=0.0), timeout=60)
        assert reply.usage.completion_tokens > 0
        assert states[-1] == grpc.ChannelConnectivity.READY, states
    assert states.count(grpc.ChannelConnectivity.READY) == 1, states    # never reconnected
