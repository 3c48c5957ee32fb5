"""The gRPC port's server options (actors/serving/grpc_port.py) on a real in-process gRPC server,
and the proxy's answer to a request that does not parse (actors/serving/grpc_proxy.py), without
Ray."""
from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from actors.serving import grpc_port, grpc_proxy
from actors.serving.grpc_port import (
    DEFAULT_MAX_RECEIVE_BYTES,
    MAX_RECEIVE_ENV,
    MAX_RECEIVE_RANGE,
    MIN_PING_INTERVAL_ENV,
    server_options,
)
from protos import generator_pb2 as pb

MiB = 2**20


def test_the_defaults_limit_messages_and_accept_5_s_pings():
    assert dict(server_options({})) == {
        "grpc.max_receive_message_length": DEFAULT_MAX_RECEIVE_BYTES,
        "grpc.http2.min_ping_interval_without_data_ms": 4000,
        "grpc.keepalive_permit_without_calls": 1}
    env = {MAX_RECEIVE_ENV: "8388608", MIN_PING_INTERVAL_ENV: " 10000 "}
    assert dict(server_options(env))["grpc.max_receive_message_length"] == 8 * MiB
    assert dict(server_options(env))["grpc.http2.min_ping_interval_without_data_ms"] == 10000


@given(st.one_of(st.integers(max_value=MAX_RECEIVE_RANGE[0] - 1),
                 st.integers(min_value=MAX_RECEIVE_RANGE[1] + 1)).map(str)
       | st.sampled_from(["4MiB", "1e6", "four", "-", "0x400"]))
def test_a_bad_receive_limit_names_the_variable_and_its_range(text):
    with pytest.raises(ValueError, match=re.escape(
            f"{MAX_RECEIVE_ENV} must be an integer in [1024, 2147483647], got {text.strip()!r}")):
        server_options({MAX_RECEIVE_ENV: text})


def test_a_negative_ping_interval_names_the_variable():
    with pytest.raises(ValueError, match=f"{MIN_PING_INTERVAL_ENV} must be an integer in"):
        server_options({MIN_PING_INTERVAL_ENV: "-1"})


def test_the_callback_replaces_serves_defaults_and_adds_no_middleware(monkeypatch):
    from ray.serve._private import grpc_util
    monkeypatch.setattr(grpc_util, "DEFAULT_GRPC_SERVER_OPTIONS",
                        [("grpc.max_send_message_length", 7),
                         ("grpc.max_receive_message_length", 2**31 - 1)])
    monkeypatch.setattr(grpc_port, "_installed", False)
    assert grpc_port.set_grpc_server_options() == [] and grpc_port.installed()
    options = dict(grpc_util.DEFAULT_GRPC_SERVER_OPTIONS)
    assert options == {"grpc.max_send_message_length": 7, **dict(server_options())}


async def _call_with(options: list, handler: grpc.RpcMethodHandler, payload: bytes,
                     streams: bool = False) -> tuple[grpc.StatusCode, str, list]:
    """Serve `handler` as /t.S/M on an in-process server with `options`; call it with
    `payload`: (status, details, replies)."""
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"M": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_send_message_length", -1)]) as channel:
            kind = channel.unary_stream if streams else channel.unary_unary
            call = kind("/t.S/M")(payload, timeout=10)
            replies = [r async for r in call] if streams else [await call]
            return grpc.StatusCode.OK, "", replies
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details(), []
    finally:
        await server.stop(None)


async def _echo_length(request: bytes, context) -> bytes:
    return str(len(request)).encode()


def test_the_receive_limit_refuses_a_larger_message_and_passes_a_smaller_one():
    handler = grpc.unary_unary_rpc_method_handler(_echo_length)
    code, details, _ = asyncio.run(_call_with(server_options({}), handler, b"x" * (8 * MiB)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
    code, _, replies = asyncio.run(_call_with(server_options({}), handler, b"x" * MiB))
    assert (code, replies) == (grpc.StatusCode.OK, [str(MiB).encode()])


def _proxy_like(streams: bool) -> grpc.RpcMethodHandler:
    """A handler as Serve's proxy builds it (the message parsed, behaviours routed), wrapped by
    grpc_proxy._checked."""
    async def unary(request, context):
        return request.prompt.encode()

    async def stream(request, context):
        for char in request.prompt:
            yield char.encode()
    make = grpc.unary_stream_rpc_method_handler if streams else grpc.unary_unary_rpc_method_handler
    handler = make(stream if streams else unary,
                   request_deserializer=pb.GenerateRequest.FromString)
    return grpc_proxy._checked("/t.S/M", handler._replace(unary_unary=unary,
                                                          unary_stream=stream))


@pytest.mark.parametrize("streams", [False, True])
@given(payload=st.binary(max_size=64))
def test_any_bytes_get_a_reply_or_invalid_argument_naming_the_message_type(streams, payload):
    """Bytes that parse are served as before; any others are INVALID_ARGUMENT naming the type,
    never UNKNOWN with the parser's words."""
    try:
        prompt = pb.GenerateRequest.FromString(payload).prompt
    except DecodeError:
        prompt = None
    code, details, replies = asyncio.run(_call_with([], _proxy_like(streams), payload, streams))
    if prompt is None:
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "the request message does "
                                   "not parse as a mixtral_ep.v1.GenerateRequest")
    else:
        assert code == grpc.StatusCode.OK
        assert b"".join(replies) == prompt.encode()
