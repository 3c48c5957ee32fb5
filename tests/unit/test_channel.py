"""actors/experts/channel.py's server on loopback, without Ray: the wire format, zero-copy rows in
and out, errors inside the expert, and the secret (a wrong or missing one is refused and
logged)."""
from __future__ import annotations

import logging
import struct

import pytest
import torch
import zmq

from actors.experts.channel import DTYPES, REPLY, REQUEST, USER, ChannelServer

SECRET = "s3cret-" + "x" * 57


def double(layer: int, x: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, float]:
    if layer == 99:
        raise ValueError("layer 99 does not exist")
    return x * 2 + layer, 0.25


@pytest.fixture(scope="module")
def server():
    return ChannelServer(double, "127.0.0.1", SECRET)


def request(server, x: torch.Tensor, layer: int, password: bytes | None, timeout_ms: int = 5000):
    """One request on a fresh DEALER; the reply frames, or None if none came in time."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    socket.sndtimeo = timeout_ms    # a refused handshake can leave no pipe: send would block
    if password is not None:
        socket.plain_username, socket.plain_password = USER, password
    socket.connect(server.endpoint)
    try:
        counts = [x.shape[0] - 1, 1]
        head = (REQUEST.pack(7, layer, x.shape[0], 2, DTYPES.index(x.dtype))
                + struct.pack("<2i", *counts))
        try:
            socket.send_multipart([head, x.contiguous().view(torch.uint8).numpy()])
        except zmq.Again:
            return None
        if not socket.poll(timeout_ms):
            return None
        return socket.recv_multipart()
    finally:
        socket.close(linger=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_round_trip(server, dtype):
    x = torch.randn(5, 16).to(dtype)
    head, body = request(server, x, 3, SECRET.encode())
    seq, seconds, ok = REPLY.unpack(head)
    assert (seq, seconds, ok) == (7, 0.25, 1)
    y = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(dtype).view(5, 16)
    assert torch.equal(y, x * 2 + 3)


def test_the_listener_is_on_the_given_address_only(server):
    assert server.endpoint.startswith("tcp://127.0.0.1:")


def test_an_error_in_the_expert_is_returned_not_raised(server):
    head, body = request(server, torch.randn(2, 4), 99, SECRET.encode())
    assert REPLY.unpack(head)[2] == 0 and b"layer 99 does not exist" in body
    assert request(server, torch.randn(2, 4), 1, SECRET.encode()) is not None   # still serving


@pytest.mark.parametrize("password", [b"wrong", None])
def test_a_wrong_or_missing_secret_is_refused_and_logged(server, caplog, password):
    with caplog.at_level(logging.DEBUG, logger="actors.experts.channel"):
        assert request(server, torch.randn(2, 4), 1, password, timeout_ms=1500) is None
    if password is not None:       # a NULL-mechanism peer fails the handshake before ZAP runs
        assert any("refused a peer" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING)
    assert request(server, torch.randn(2, 4), 1, SECRET.encode()) is not None
