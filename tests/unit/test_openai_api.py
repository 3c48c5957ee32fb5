"""actors/openai_api.py without a server: request models (strict types, unknown fields), their
translation to engine inputs (defaults, limits), and response bodies. tests/e2e/test_openai.py
has the same through Serve's HTTP proxy with the official client."""
from __future__ import annotations

import pydantic
import pytest

from actors import openai_api as oai
from actors.info import EngineInfo
from model.errors import InvalidRequest
from model.tokenizer import Tokenizer

INFO = EngineInfo(context_length=256, vocab_size=32000, num_layers=2, num_experts=8,
                  experts_per_token=2, frontend_node_id="head", experts={}, free_blocks=1,
                  total_blocks=1, retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()


@pytest.mark.parametrize("body", [
    {"prompt": [1, True, 2]}, {"prompt": ["1", 2]}, {"prompt": "hi", "temperature": "0.5"},
    {"prompt": "hi", "logprobs": False}, {"prompt": "hi", "stream": "yes"},
    {"prompt": "hi", "max_tokens": 2.5}, {"prompt": "hi", "frobnicate": 1},
])
def test_completion_types_are_strict_and_unknown_fields_refused(body):
    with pytest.raises(pydantic.ValidationError):
        oai.CompletionRequest.model_validate({"model": "m"} | body)


def test_ints_still_pass_as_floats():
    r = oai.CompletionRequest.model_validate({"model": "m", "prompt": "hi", "temperature": 1})
    assert r.temperature == 1


def test_default_max_tokens_16_for_completions_the_rest_of_the_context_for_chat(tokenizer):
    ids, params = oai.completion_inputs(oai.CompletionRequest(model="m", prompt="hi"), tokenizer, INFO)
    assert params.max_tokens == 16
    long = oai.CompletionRequest(model="m", prompt=list(range(3, 3 + 250)))
    assert oai.completion_inputs(long, tokenizer, INFO)[1].max_tokens == 256 - 250
    chat = oai.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    ids, params = oai.chat_inputs(chat, tokenizer, INFO)
    assert params.max_tokens == INFO.context_length - len(ids)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(stop=["x"] * 17), "stop must hold at most 16 strings"),
    (dict(stop="y" * 1025), "of at most 1024 characters"),
    (dict(n=2), "n: only 1"),
    (dict(top_k=-2), "top_k must be"),
])
def test_limits_name_the_field(tokenizer, kwargs, needle):
    with pytest.raises(InvalidRequest, match=needle):
        oai.completion_inputs(oai.CompletionRequest(model="m", prompt="hi", **kwargs), tokenizer, INFO)


def test_vllms_top_k_minus_one_is_no_cut(tokenizer):
    r = oai.CompletionRequest(model="m", prompt="hi", top_k=-1)
    assert oai.completion_inputs(r, tokenizer, INFO)[1].top_k == 0


def test_top_logprobs_needs_logprobs(tokenizer):
    r = oai.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                  top_logprobs=0)
    with pytest.raises(InvalidRequest, match="top_logprobs: needs logprobs: true"):
        oai.chat_inputs(r, tokenizer, INFO)


def test_another_models_name_is_model_not_found():
    with pytest.raises(oai.ModelNotFound, match="this server serves 'm'"):
        oai.check_model(oai.CompletionRequest(model="gpt-4", prompt="hi"), "m")


def test_whole_and_chunk_bodies(tokenizer):
    out = oai.Response(True, "m", tokenizer, logprobs=True, token_ids=True)
    body = out.whole("Hi", [1, 2], [-0.5, -1.0], "length", 3)
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hi"}
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [-0.5, -1.0]
    assert choice["token_ids"] == [1, 2] and body["usage"]["total_tokens"] == 5
    event = out.chunk("Hi", [1], [-0.5], None, first=True)
    assert event.startswith('data: {"id": "chatcmpl-') and '"role": "assistant"' in event
    assert oai.DONE == "data: [DONE]\n\n"
