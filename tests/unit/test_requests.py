"""gRPC request validation and error-to-status mapping (no server)."""
from __future__ import annotations

import grpc
import pytest

from actors.gateway import _status
from actors.requests import InvalidRequest, prompt_ids, sampling_params
from model.engine import QueueFull
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()


def test_defaults_and_explicit_values(tokenizer):
    req = pb.GenerateRequest(prompt="Hello")
    ids = prompt_ids(req, tokenizer, 100)
    assert ids == tokenizer.encode("Hello")
    p = sampling_params(req, len(ids), 100)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (16, 1.0, 1.0, 0, None)
    req = pb.GenerateRequest(prompt="x", max_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=7,
                             stop=["\n"])
    p = sampling_params(req, 2, 100)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (5, 0, 0.5, 3, 7, ("\n",))


@pytest.mark.parametrize("req, match", [
    (pb.GenerateRequest(prompt="hi", max_tokens=99), r"max_tokens must be in \[1, 98\]"),
    (pb.GenerateRequest(prompt="hi", temperature=-0.5), "temperature must be a finite number >= 0"),
    (pb.GenerateRequest(prompt="hi", top_k=-1), "top_k must be"),
])
def test_limits_are_named(tokenizer, req, match):
    ids = prompt_ids(req, tokenizer, 100)
    with pytest.raises(InvalidRequest, match=match):
        sampling_params(req, len(ids), 100)


def test_status_mapping():
    assert _status(InvalidRequest("top_p must be in (0, 1]"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _status(QueueFull("9 requests are waiting"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, details = _status(RuntimeError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in details
