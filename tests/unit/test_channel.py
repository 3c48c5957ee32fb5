"""actors/experts/channel_server.py's server on loopback, without Ray: the wire format, zero-copy
rows in and out, errors inside the expert, the secret (a wrong or missing one is refused and
logged), the frame bound (from the largest legitimate call), malformed calls (answered, and the
server serves on), and a dying thread (it calls on_death)."""
from __future__ import annotations

import inspect
import logging
import socket
import struct
import threading
import time

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.experts.channel import DTYPES, REPLY, REQUEST, USER
from actors.experts.channel_server import NO_SEQ, CallBound, ChannelServer, MalformedCall
from actors.experts.worker import ENGINE_MAX_TOKENS
from actors.options import EngineOptions
from model.engine import Engine

SECRET = "s3cret-" + "x" * 57
D, MAX_ROWS = 16, 24              # hidden size; rows of the largest call (CallBound.of(12, 2, 2))
LOGGER = "actors.experts.channel_server"


def double(layer: int, x: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, float]:
    if layer == 99:
        raise ValueError("layer 99 does not exist")
    return x * 2 + layer, 0.25


def bound(dtype: torch.dtype = torch.float32) -> CallBound:
    return CallBound.of(12, top_k=2, num_experts=2, hidden_size=D, dtype=dtype)


@pytest.fixture(scope="module")
def servers():
    """One server per dtype (an actor computes in its own dtype)."""
    return {dtype: ChannelServer(double, "127.0.0.1", SECRET, bound(dtype))
            for dtype in (torch.float32, torch.bfloat16)}


@pytest.fixture(scope="module")
def server(servers):
    return servers[torch.float32]


def header(x: torch.Tensor, layer: int = 1, seq: int = 7, counts=None) -> bytes:
    counts = [x.shape[0] - 1, 1] if counts is None else counts
    return (REQUEST.pack(seq, layer, x.shape[0], len(counts), DTYPES.index(x.dtype))
            + struct.pack(f"<{len(counts)}i", *counts))


def exchange(server, frames: list, password: bytes | None = SECRET.encode(),
             timeout_ms: int = 5000):
    """Send `frames` on a fresh DEALER; the reply frames, or None if none came in time."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger, sock.reconnect_ivl = 0, -1       # one connection: one handshake
    sock.sndtimeo = timeout_ms    # a refused handshake can leave no pipe: send would block
    if password is not None:
        sock.plain_username, sock.plain_password = USER, password
    sock.connect(server.endpoint)
    try:
        try:
            sock.send_multipart(frames)
        except zmq.Again:
            return None
        return sock.recv_multipart() if sock.poll(timeout_ms) else None
    finally:
        sock.close(linger=0)


def request(server, x: torch.Tensor, layer: int, password: bytes | None = SECRET.encode(),
            timeout_ms: int = 5000):
    return exchange(server, [header(x, layer), as_bytes(x)], password, timeout_ms)


def as_bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


def assert_serves(server) -> None:
    x = torch.randn(3, D)
    head, body = request(server, x, 2)
    assert REPLY.unpack(head)[2] == 1
    assert torch.equal(torch.frombuffer(bytearray(body), dtype=torch.float32).view(3, D), x * 2 + 2)


def warnings_of(caplog, about: str) -> list[str]:
    """The server's WARNING lines containing `about` (others may come late from other tests)."""
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING and about in r.getMessage()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_round_trip(servers, dtype):
    x = torch.randn(5, D).to(dtype)
    head, body = request(servers[dtype], x, 3)
    seq, seconds, ok = REPLY.unpack(head)
    assert (seq, seconds, ok) == (7, 0.25, 1)
    y = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(dtype).view(5, D)
    assert torch.equal(y, x * 2 + 3)


def test_a_call_of_no_rows_gets_an_empty_reply_and_the_server_serves_on(server):
    """Zero rows is a well-formed call (counts all 0): before, its empty reply could not be
    framed and the error ended the channel's thread, and with it the actor."""
    x = torch.empty(0, D)
    head, body = exchange(server, [header(x, counts=[0, 0]), b""])
    assert REPLY.unpack(head)[0::2] == (7, 1) and body == b""
    assert_serves(server)


def test_the_listener_is_on_the_given_address_only(server):
    assert server.endpoint.startswith("tcp://127.0.0.1:")


def test_an_error_in_the_expert_is_returned_not_raised(server):
    head, body = request(server, torch.randn(2, D), 99)
    assert REPLY.unpack(head)[2] == 0 and b"layer 99 does not exist" in body
    assert request(server, torch.randn(2, D), 1) is not None   # still serving


WRONG = b"not-the-secret-" + b"9" * 20


@pytest.mark.parametrize("password", [WRONG, None])
def test_a_wrong_or_missing_secret_is_refused_and_logged(server, caplog, password):
    """One WARNING line per refused peer, for a wrong secret (ZAP) and for none (a NULL peer
    fails the handshake before ZAP runs), and neither secret in any log line."""
    with caplog.at_level(logging.DEBUG):
        assert request(server, torch.randn(2, D), 1, password, timeout_ms=1500) is None
        deadline = time.monotonic() + 5
        while not warnings_of(caplog, "refused a peer") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)                             # no second line follows
        assert len(warnings_of(caplog, "refused a peer")) == 1, caplog.text
        assert_serves(server)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in logged and WRONG.decode() not in logged


# ---- the frame bound ---------------------------------------------------------------------------
def test_the_bound_follows_from_the_largest_call():
    b = CallBound.of(2048, top_k=2, num_experts=4, hidden_size=4096, dtype=torch.bfloat16)
    assert b.max_rows == 4096 and b.max_frame_bytes == 4096 * 4096 * 4   # rows may be fp32
    assert CallBound.of(2048, 2, 1, 4096, torch.bfloat16).max_rows == 2048    # one id: A pairs
    assert bound().max_frame_bytes == MAX_ROWS * D * 4
    assert CallBound.of(1, 2, 8, 1, torch.float32).max_frame_bytes == REQUEST.size + 4 * 8
    engine_default = inspect.signature(Engine.__init__).parameters["max_num_batched_tokens"]
    assert ENGINE_MAX_TOKENS == engine_default.default == EngineOptions().max_num_batched_tokens
    assert EngineOptions(engine_args={"max_num_batched_tokens": 64}).max_num_batched_tokens == 64


def test_a_call_of_the_largest_size_passes_and_a_byte_more_is_dropped(server):
    x = torch.randn(MAX_ROWS, D)
    head, body = exchange(server, [header(x, counts=[MAX_ROWS - 5, 5]), as_bytes(x)])
    assert REPLY.unpack(head)[2] == 1 and len(body) == MAX_ROWS * D * 4
    over = as_bytes(x) + b"\0"
    assert exchange(server, [header(x, counts=[MAX_ROWS - 5, 5]), over], timeout_ms=1000) is None
    assert_serves(server)


def zmtp_greeting(mechanism: bytes = b"PLAIN") -> bytes:
    """ZMTP 3.0's greeting (RFC 23): signature, version 3.0, mechanism, as-server 0, filler."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" * 32


@pytest.mark.parametrize("size,dropped", [(1 << 30, True), (MAX_ROWS * D * 4, False),
                                          (MAX_ROWS * D * 4 + 1, True)])
def test_an_unauthenticated_frame_over_the_bound_is_dropped_at_its_header(server, size, dropped):
    """Before any secret: a greeting, then a long command frame's header announcing `size`
    bytes and 100 of them. Over the bound the server closes the connection at once, never
    reading the body; within it, it waits for the rest."""
    host, port = server.endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as raw:
        raw.sendall(zmtp_greeting())
        raw.recv(64)
        raw.sendall(b"\x06" + struct.pack(">Q", size) + b"\0" * 100)
        try:
            closed = raw.recv(1 << 16) == b""
        except TimeoutError:
            closed = False
    assert closed == dropped
    assert_serves(server)


# ---- malformed calls from an authenticated peer ----------------------------------------------
X = torch.randn(4, D)
GOOD = [header(X), as_bytes(X)]
MALFORMED = {                     # name -> (frames, the sequence the reply carries)
    "one frame": ([GOOD[0]], 7),
    "three frames": (GOOD + [b"x"], 7),
    "four frames": (GOOD + [b"x", b"y"], 7),
    "an empty frame": ([b""], NO_SEQ),
    "a short header": ([GOOD[0][:5], GOOD[1]], NO_SEQ),
    "a header without counts": ([GOOD[0][:REQUEST.size], GOOD[1]], 7),
    "a bad dtype code": ([REQUEST.pack(7, 1, 4, 2, 9) + GOOD[0][REQUEST.size:], GOOD[1]], 7),
    "k other than the actor's": ([header(X, counts=[1, 1, 2]), GOOD[1]], 7),
    "rows not n x D": ([GOOD[0], GOOD[1][:-4]], 7),
    "a huge n": ([REQUEST.pack(7, 1, 2 ** 32 - 1, 2, 0) + GOOD[0][REQUEST.size:], GOOD[1]], 7),
    "negative counts": ([header(X, counts=[5, -1]), GOOD[1]], 7),
    "counts not summing to n": ([header(X, counts=[1, 1]), GOOD[1]], 7),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_call_gets_an_error_reply_and_the_server_serves_on(server, caplog, name):
    frames, seq = MALFORMED[name]
    with caplog.at_level(logging.WARNING):
        head, body = exchange(server, frames)
        assert REPLY.unpack(head)[0] == seq and REPLY.unpack(head)[2] == 0
        assert body.startswith(b"MalformedCall: ")
        assert len(warnings_of(caplog, "malformed call")) == 1
        assert_serves(server)


header_fields = st.tuples(st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 32 - 1),
                          st.sampled_from([0, 1, 3, 4, 24, 25, 2 ** 32 - 1]), st.integers(0, 4),
                          st.integers(0, 255))
frame = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda h, counts: REQUEST.pack(*h) + struct.pack(f"<{len(counts)}i", *counts),
              header_fields, st.lists(st.integers(-2, 30), max_size=4)),
    st.builds(lambda n, extra: b"\0" * (n * D * 4 + extra), st.integers(0, MAX_ROWS - 1),
              st.sampled_from([0, -1, 1, 4])))        # within the bound: every frame is read


@settings(max_examples=150, deadline=None)
@given(st.lists(frame, max_size=5))
def test_parse_returns_a_call_or_raises_malformed_call(frames):
    try:
        seq, layer, x, counts, dtype = bound().parse(frames)
    except MalformedCall:
        return
    assert x.shape == (sum(counts), D) and len(counts) == 2 and min(counts) >= 0
    assert x.dtype == torch.float32 and dtype in DTYPES


@pytest.mark.parametrize(("actor", "rows"), [(torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16)])
def test_rows_in_another_dtype_are_computed_in_the_actors_and_answered_in_theirs(
        servers, actor, rows):
    """A frontend whose dtype auto chose another compute dtype than the actor's (CPUs with and
    without native bf16 in one cluster) is served: computed in the actor's dtype, answered in
    the rows' own. (This was a MalformedCall.)"""
    x = torch.randn(5, D).to(rows)
    head, body = request(servers[actor], x, 3)
    assert REPLY.unpack(head)[2] == 1, body
    got = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(rows).view(5, D)
    assert torch.equal(got, (x.to(actor) * 2 + 3).to(rows))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])   # the server is shared
@given(st.lists(frame, min_size=1, max_size=5))
def test_any_frames_get_a_reply_and_the_server_serves_on(server, frames):
    reply = exchange(server, frames)
    assert reply is not None and len(reply) == 2
    assert_serves(server)


# ---- a thread that dies ----------------------------------------------------------------------
class _Fatal(BaseException):
    """Not an Exception: nothing on the way catches it, as a SystemExit or a bug would not be."""


def test_a_dying_thread_calls_on_death(caplog):
    died = threading.Event()

    def fatal(layer, x, counts):
        raise _Fatal("the serving loop cannot go on")
    dying = ChannelServer(fatal, "127.0.0.1", SECRET, bound(), on_death=died.set)
    with caplog.at_level(logging.CRITICAL, logger=LOGGER):
        assert request(dying, torch.randn(2, D), 1, timeout_ms=1000) is None
        assert died.wait(5)
    assert any("died" in r.getMessage() and r.exc_info for r in caplog.records
               if r.levelno == logging.CRITICAL)
    dying.thread.join(5)
    assert not dying.thread.is_alive()
