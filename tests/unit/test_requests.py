"""gRPC request validation, ModelInfo building, the error-to-status mapping and each failed
request's one log line (no server; tests/e2e/ has the same over a real channel)."""
from __future__ import annotations

import json
import logging

import grpc
import pytest
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from actors.experts.dispatcher import ExpertCallError
from actors.failover import unwrap
from actors.info import QUANTIZATION_NONE, EngineInfo, checkpoint_quantization
from actors.serving import status
from actors.serving.grpc_messages import model_info, prompt_ids, sampling_params
from actors.serving.grpc_servicer import set_status
from actors.serving.http_app import http_error
from actors.serving.status import HTTP_STATUS, status_of
from model.checkpoint import CheckpointError, WeightSource
from model.config import PRESETS
from model.errors import InvalidRequest, QueueFull
from model.tokenizer import ChatTemplateError, Tokenizer
from protos import generator_pb2 as pb

VOCAB = 32000                   # the tokenizer's: token ids are checked against it


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()


def test_defaults_and_explicit_values(tokenizer):
    req = pb.GenerateRequest(prompt="Hello")
    ids = prompt_ids(req, tokenizer, 100, VOCAB)
    assert ids == tokenizer.encode("Hello")
    p = sampling_params(req, len(ids), 100, VOCAB)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (16, 1.0, 1.0, 0, None)
    req = pb.GenerateRequest(prompt="x", max_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=7,
                             stop=["\n"])
    p = sampling_params(req, 2, 100, VOCAB)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (
        5, 0, 0.5, 3, 7, ("\n",))


@pytest.mark.parametrize("req, match", [
    (pb.GenerateRequest(prompt="hi", max_tokens=99), r"max_tokens must be in \[1, 98\]"),
    (pb.GenerateRequest(prompt="hi", temperature=-0.5), "temperature must be a finite number >= 0"),
    (pb.GenerateRequest(prompt="hi", top_k=-1), "top_k must be"),
])
def test_limits_are_named(tokenizer, req, match):
    ids = prompt_ids(req, tokenizer, 100, VOCAB)
    with pytest.raises(InvalidRequest, match=match):
        sampling_params(req, len(ids), 100, VOCAB)


@pytest.mark.parametrize("req, field", [
    (pb.GenerateRequest(prompt="x" * 1_000_001), "prompt"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="y " * 500_000)]),
     "messages"),
])
def test_a_text_too_long_for_the_context_is_refused_before_encoding(tokenizer, req, field,
                                                                    monkeypatch):
    """A megabyte prompt once held the gateway's event loop for seconds while it was encoded."""
    limit = tokenizer.max_token_chars * 4096
    monkeypatch.setattr(tokenizer, "encode", None)            # encoding it would fail the test
    monkeypatch.setattr(tokenizer, "apply_chat_template", None)
    with pytest.raises(InvalidRequest, match=rf"^{field} is 10000\d\d characters; 4096 tokens "
                                             rf"\(the context length\) hold at most {limit}"):
        prompt_ids(req, tokenizer, 4096, VOCAB)


def test_the_longest_text_that_can_fit_is_encoded(tokenizer):
    """The bound is safe: no text of n * max_token_chars characters has fewer than n tokens."""
    longest = max(range(tokenizer.vocab_size), key=lambda i: len(tokenizer.decode([i])))
    text = tokenizer.decode([longest]) * 50
    assert len(tokenizer.encode(text, bos=False)) * tokenizer.max_token_chars >= len(text)
    assert prompt_ids(pb.GenerateRequest(prompt=text), tokenizer, 4096, VOCAB)


def test_model_info_from_engine_info():
    info = EngineInfo(context_length=4096, vocab_size=32000, num_layers=2, num_experts=2,
                      experts_per_token=2, frontend_node_id="head",
                      experts={1: ("n1",), 0: ("n0", "n2")}, free_blocks=3, total_blocks=4,
                      retries=0)
    reply = model_info("tiny", info)
    assert (reply.model, reply.context_length, reply.num_layers, reply.frontend_node_id) == (
        "tiny", 4096, 2, "head")
    assert [(e.expert_id, list(e.node_ids)) for e in reply.experts] == [(0, ["n0", "n2"]),
                                                                        (1, ["n1"])]


def test_model_info_reports_the_dtype_and_quantization(tmp_path):
    """Issue 25: EngineInfo's dtype and quantization reach ModelInfoResponse; a source's
    quantization is "fp8" for an FP8 checkpoint (its config.json), "int8" when quantized at
    load, "" otherwise."""
    info = EngineInfo(context_length=64, vocab_size=100, num_layers=2, num_experts=2,
                      experts_per_token=2, frontend_node_id="head", experts={}, free_blocks=1,
                      total_blocks=1, retries=0, dtype="bfloat16", quantization="fp8")
    reply = model_info("tiny", info)
    assert (reply.dtype, reply.quantization) == ("bfloat16", "fp8")
    config = PRESETS["tiny"]
    assert checkpoint_quantization(WeightSource(config=config)) == QUANTIZATION_NONE == ""
    assert checkpoint_quantization(WeightSource(config=config, quantization="int8")) == "int8"
    (tmp_path / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}))
    assert checkpoint_quantization(WeightSource(path=str(tmp_path))) == "fp8"


def _torch_value_error() -> ValueError:
    try:
        torch.distributions.Normal(0.0, -1.0)       # torch's own argument check
    except ValueError as e:
        return e
    raise AssertionError("torch accepted a negative scale")


CODE = grpc.StatusCode
ERRORS = [    # (error, code, whether the client may see its text)
    (InvalidRequest("top_p must be in (0, 1], got 2"), CODE.INVALID_ARGUMENT, True),
    (ChatTemplateError("messages[1].content must not be empty"), CODE.INVALID_ARGUMENT, True),
    (QueueFull("9 requests are waiting (max_waiting=8)"), CODE.RESOURCE_EXHAUSTED, False),
    (BackPressureError(num_queued_requests=9, max_queued_requests=8), CODE.RESOURCE_EXHAUSTED,
     False),
    (DeploymentUnavailableError(DeploymentID("EngineServer", "app")), CODE.UNAVAILABLE, False),
    (ActorDiedError(), CODE.UNAVAILABLE, False),
    (ActorUnavailableError("restarting secret", None), CODE.UNAVAILABLE, False),
    (ValueError("config.json secret: hidden_size must be even"), CODE.INTERNAL, False),
    (CheckpointError("tensor 'secret.weight' has shape (2,)"), CODE.INTERNAL, False),
    (_torch_value_error(), CODE.INTERNAL, False),
    (RuntimeError("secret: probability tensor contains nan"), CODE.INTERNAL, False),
    (ExpertCallError("layer 3: experts [1] failed: secret"), CODE.INTERNAL, False),
]


def ray_wrapped(error: Exception, hops: int) -> Exception:
    """`error` as the gateway gets it after crossing `hops` Ray actor calls."""
    for i in range(hops):
        error = RayTaskError(f"hop{i}", "Traceback (most recent call last): secret frames",
                             error).as_instanceof_cause()
    return error


@pytest.mark.parametrize("hops", [0, 1, 2])
@pytest.mark.parametrize("error, code, shows_text", ERRORS,
                         ids=[type(e).__name__ for e, _, _ in ERRORS])
def test_every_error_kind_maps_to_its_status(error, code, shows_text, hops):
    wrapped = ray_wrapped(error, hops)
    assert unwrap(wrapped) is error
    got, details = status_of(wrapped)
    assert got == code
    if shows_text:
        assert details == str(error)
    else:
        assert "secret" not in details and "Traceback" not in details and details


def test_a_ray_wrapped_internal_value_error_is_a_value_error_yet_internal():
    wrapped = ray_wrapped(_torch_value_error(), 1)
    assert isinstance(wrapped, ValueError) and isinstance(wrapped, RayTaskError)
    assert status_of(wrapped)[0] == CODE.INTERNAL


class _Context:
    """Records what the gateway sets (Serve's RayServegRPCContext needs a live call)."""
    code = details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


class _Records(logging.Handler):
    """Keeps the records a logger handles (its own handler, not caplog's: pytest >= 9.1 also
    attaches caplog's handler to every non-propagating logger, Serve's among them, so a test
    that adds caplog.handler itself sees each record twice)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def status_log():
    """The records of the failure log (Serve's loggers do not propagate), from INFO up."""
    handler, logger = _Records(), status.log
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("error, level", [(InvalidRequest("top_k must be >= 0"), logging.INFO),
                                          (QueueFull("full"), logging.INFO),
                                          (ValueError("secret\nsecond line"), logging.ERROR)])
def test_each_failed_request_logs_one_line_without_traceback(status_log, error, level):
    context = _Context()
    set_status(context, ray_wrapped(error, 1))
    assert (context.code, context.details) == status_of(error)
    [record] = status_log
    assert record.levelno == level and record.exc_info is None
    assert "\n" not in record.getMessage()


@pytest.mark.parametrize("error, grpc_words, http_words", [
    (InvalidRequest("top_k must be >= 0"), "INVALID_ARGUMENT", "400"),
    (QueueFull("full"), "RESOURCE_EXHAUSTED", "429"),
    (ValueError("secret"), "INTERNAL", "500")])
def test_a_failure_is_logged_in_its_protocols_words(status_log, error, grpc_words, http_words):
    """gRPC calls are logged with gRPC codes, HTTP requests with HTTP statuses."""
    set_status(_Context(), ray_wrapped(error, 1))
    response = http_error(ray_wrapped(error, 1))
    assert response.status_code == int(http_words)
    grpc_line, http_line = (r.getMessage() for r in status_log)
    assert grpc_words in grpc_line and http_words not in grpc_line
    assert f"({http_words})" in http_line or f"answered {http_words}:" in http_line
    assert grpc_words not in http_line


@pytest.mark.parametrize("error, http", [
    (InvalidRequest("x"), 400), (QueueFull("x"), 429),
    (BackPressureError(num_queued_requests=1, max_queued_requests=1), 429),
    (DeploymentUnavailableError(DeploymentID("d", "app")), 503), (ValueError("x"), 500),
    (RuntimeError("x"), 500)])
def test_every_status_has_its_http_status(error, http):
    assert HTTP_STATUS[status_of(error)[0]] == http
