"""actors/serving/grpc_messages.py and the servicer without Ray: GenerateRequests to engine
inputs (every option, token-id prompts, each bad field named), responses built from chunks and
completions (choices, alternatives, prompt logprobs, usage), and wire compatibility with a
client compiled from the proto as it was before issue 21 (tests/unit/data/). The servicer runs
in-process on a fake engine. tests/e2e/test_grpc_sampling.py has the same through Serve."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from actors.info import EngineInfo
from actors.serving import grpc_messages as gm
from actors.serving.engine_client import EngineClient
from actors.serving.grpc_servicer import GeneratorServicer
from model.engine import Completion, SamplingParams, StreamChunk
from model.errors import InvalidRequest
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb

OLD_PROTO = Path(__file__).parent / "data" / "generator_v1_before_issue21.proto"
CONTEXT, VOCAB = 256, 32000
TOP = [(22557, -0.25), (1526, -1.5)]                  # (token id, logprob), most likely first


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained()


def params_of(req: pb.GenerateRequest, prompt_len: int = 3) -> SamplingParams:
    return gm.sampling_params(req, prompt_len, CONTEXT, VOCAB)


def test_every_new_option_reaches_sampling_params():
    req = pb.GenerateRequest(
        prompt="hi", max_tokens=9, n=3, top_logprobs=4, prompt_logprobs=2, presence_penalty=0.5,
        frequency_penalty=-1.5, repetition_penalty=1.25, logit_bias={7: 5.0, 3: -100.0},
        min_tokens=2, stop_token_ids=[13, 2], ignore_eos=True, seed=11, cache_salt="tenant-a")
    assert params_of(req) == SamplingParams(
        max_tokens=9, seed=11, n=3, top_logprobs=4, prompt_logprobs=2, presence_penalty=0.5,
        frequency_penalty=-1.5, repetition_penalty=1.25, logit_bias={3: -100.0, 7: 5.0},
        min_tokens=2, stop_token_ids=(13, 2), ignore_eos=True, cache_salt="tenant-a")


def test_max_tokens_0_is_allowed_only_to_score_the_prompt():
    assert params_of(pb.GenerateRequest(max_tokens=0, prompt_logprobs=0)).max_tokens == 0
    with pytest.raises(InvalidRequest, match="max_tokens must be in"):
        params_of(pb.GenerateRequest(max_tokens=0))


@pytest.mark.parametrize("fields, message", [
    ({"n": 0}, "n must be an integer in [1, 16]"),
    ({"n": 17}, "n must be an integer in [1, 16]"),
    ({"top_logprobs": 21}, "top_logprobs must be an integer in [0, 20]"),
    ({"top_logprobs": -1}, "top_logprobs must be an integer in [0, 20]"),
    ({"prompt_logprobs": 21}, "prompt_logprobs must be an integer in [0, 20]"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0"),
    ({"logit_bias": {5: 101}}, "logit_bias values must be in [-100, 100]"),
    ({"logit_bias": {VOCAB: 1}}, "logit_bias: token ids must be in [0, 32000)"),
    ({"logit_bias": {-1: 1}}, "logit_bias: token ids must be in [0, 32000)"),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias must hold at most 300"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be an integer in [0, max_tokens (4)]"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids: token ids must be in [0, 32000)"),
    ({"cache_salt": ""}, "cache_salt must be a non-empty string of at most 1024 characters"),
    ({"cache_salt": "s" * 1025}, "cache_salt must be a non-empty string of at most 1024"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_each_bad_option_names_its_field_and_limit(fields, message):
    with pytest.raises(InvalidRequest) as err:
        params_of(pb.GenerateRequest(prompt="hi", **fields))
    assert message in str(err.value)


def test_a_token_id_prompt_is_sent_as_is(tokenizer):
    req = pb.GenerateRequest(prompt_token_ids=[1, 22557, 1526])
    assert gm.prompt_ids(req, tokenizer, CONTEXT, VOCAB) == [1, 22557, 1526]


@pytest.mark.parametrize("fields, message", [
    ({"prompt": "hi", "prompt_token_ids": [1]}, "got prompt and prompt_token_ids"),
    ({"messages": [pb.ChatMessage(role="user", content="x")], "prompt_token_ids": [1]},
     "got messages and prompt_token_ids"),
    ({"prompt_token_ids": [1, VOCAB]}, "prompt_token_ids: prompt token ids must be integers in "
                                       "[0, 32000)"),
    ({"prompt_token_ids": [-4]}, "prompt_token_ids: prompt token ids must be integers"),
    ({"prompt_token_ids": [1] * CONTEXT}, "prompt is 256 tokens; the context length is 256"),
    ({}, "set one of prompt"),
])
def test_bad_prompts_name_the_field(tokenizer, fields, message):
    with pytest.raises(InvalidRequest) as err:
        gm.prompt_ids(pb.GenerateRequest(**fields), tokenizer, CONTEXT, VOCAB)
    assert message in str(err.value)


def completion(index: int, ids: list[int], reason: str = "length", prompt_logprobs=None):
    return Completion("r", [1, 22557, 1526], ids, f"text {index}", reason,
                      [-0.5] * len(ids), index, [TOP] * len(ids), prompt_logprobs)


PROMPT_LOGPROBS = [None, (-3.0, TOP, 4), (-1.5, TOP[:1], 2)]      # (logprob, top, rank)


def test_unary_response_with_choices_alternatives_and_prompt_logprobs(tokenizer):
    responses = gm.Responses([1, 22557, 1526], True, tokenizer.token_bytes)
    out = responses.unary([completion(0, [5, 6], prompt_logprobs=PROMPT_LOGPROBS),
                           completion(1, [7], "stop", prompt_logprobs=PROMPT_LOGPROBS)])
    assert (out.text, list(out.token_ids), out.finish_reason) == ("text 0", [5, 6], "length")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 3)
    assert [(c.index, c.text, list(c.token_ids), c.finish_reason) for c in out.choices] == [
        (0, "text 0", [5, 6], "length"), (1, "text 1", [7], "stop")]
    assert list(out.choices[1].logprobs) == [-0.5] and len(out.choices[1].top_logprobs) == 1
    alternatives = out.top_logprobs[1].alternatives
    assert [(a.token_id, a.logprob, a.token) for a in alternatives] == [
        (22557, -0.25, b" Hello"), (1526, -1.5, b" world")]
    first, second, third = out.prompt_logprobs
    assert first.token_id == 1 and not first.HasField("logprob") and not first.alternatives
    assert not first.HasField("rank")
    assert (second.token_id, second.logprob, len(second.alternatives), second.rank) == (
        22557, -3.0, 2, 4)
    assert (third.token_id, third.logprob, len(third.alternatives), third.rank) == (
        1526, -1.5, 1, 2)


def test_one_choice_without_logprobs_is_the_old_response(tokenizer):
    c = Completion("r", [1, 2], [5, 6], "ab", "stop", [-0.5, -0.25])
    out = gm.Responses([1, 2], False, tokenizer.token_bytes).unary([c])
    assert out == pb.GenerateResponse(text="ab", token_ids=[5, 6], finish_reason="stop",
                                      usage=pb.Usage(prompt_tokens=2, completion_tokens=2))


def test_a_stream_message_is_one_choices_delta(tokenizer):
    responses = gm.Responses([1, 22557, 1526], True, tokenizer.token_bytes)
    chunk = StreamChunk("r", " x", [9], [-0.75], None, 2, [TOP], PROMPT_LOGPROBS)
    out = responses.stream(chunk, None)
    assert (out.index, out.text, list(out.token_ids), list(out.logprobs)) == (2, " x", [9], [-0.75])
    assert [a.token_id for a in out.top_logprobs[0].alternatives] == [22557, 1526]
    assert len(out.prompt_logprobs) == 3 and not out.HasField("usage")


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> dict[str, type]:
    """The messages as a client compiled before issue 21 has them, from their own pool."""
    pytest.importorskip("grpc_tools")
    out = tmp_path_factory.mktemp("old") / "generator.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{OLD_PROTO.parent}",
                    f"--descriptor_set_out={out}", OLD_PROTO.name], check=True)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(files.file[0])
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"mixtral_ep.v1.{name}")) for name in ("GenerateRequest", "GenerateResponse")}


def test_old_fields_keep_their_numbers_names_and_types(old):
    for name, cls in old.items():
        new = getattr(pb, name).DESCRIPTOR
        for field in cls.DESCRIPTOR.fields:
            twin = new.fields_by_number[field.number]
            assert (twin.name, twin.type, twin.is_repeated, twin.has_presence) == (
                field.name, field.type, field.is_repeated, field.has_presence)


def test_an_old_clients_request_behaves_as_before(old, tokenizer):
    sent = old["GenerateRequest"](prompt="Hello world", max_tokens=5, temperature=0.5, top_p=0.75,
                                  top_k=3, seed=7, stop=["x"], logprobs=True)
    req = pb.GenerateRequest.FromString(sent.SerializeToString())
    ids = gm.prompt_ids(req, tokenizer, CONTEXT, VOCAB)
    assert ids == tokenizer.encode("Hello world")
    assert params_of(req, len(ids)) == SamplingParams(max_tokens=5, temperature=0.5, top_p=0.75,
                                                      top_k=3, seed=7, stop=("x",))


def test_an_old_client_reads_choice_0_of_a_new_response(old, tokenizer):
    responses = gm.Responses([1, 22557, 1526], True, tokenizer.token_bytes)
    new = responses.unary([completion(0, [5, 6], prompt_logprobs=PROMPT_LOGPROBS),
                           completion(1, [7])])
    got = old["GenerateResponse"].FromString(new.SerializeToString())
    assert (got.text, list(got.token_ids), list(got.logprobs), got.finish_reason) == (
        "text 0", [5, 6], [-0.5, -0.5], "length")
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (3, 3)


class _Chunks:
    """An engine stream of given chunks (as EngineClient.stream returns: cancel() too)."""

    def __init__(self, chunks):
        self.chunks, self.cancelled = list(chunks), False

    def __aiter__(self):
        return self._each()

    async def _each(self):
        for chunk in self.chunks:
            yield chunk

    def cancel(self):
        self.cancelled = True


class _Engine:
    """The EngineClient surface the servicer reads (its own `check`); records what each stream
    was asked."""

    check = EngineClient.check

    def __init__(self, tokenizer, chunks):
        self.tokenizer, self.chunks, self.asked = tokenizer, chunks, []

    async def info(self):
        return EngineInfo(context_length=CONTEXT, vocab_size=VOCAB, num_layers=2, num_experts=8,
                          experts_per_token=2, frontend_node_id="head", experts={},
                          free_blocks=1, total_blocks=1, retries=0)

    def stream(self, ids, params):
        self.asked.append((ids, params))
        return _Chunks(self.chunks)


class _Context:
    def invocation_metadata(self):
        return ()

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def servicer(tokenizer, chunks) -> GeneratorServicer:
    s = GeneratorServicer()
    s.engine, s.api_key_digest = _Engine(tokenizer, chunks), None
    return s


N2_CHUNKS = [StreamChunk("r", "a", [5], [-0.5], None, 0, [TOP]),
             StreamChunk("r", "b", [6], [-0.5], None, 1, [TOP]),
             StreamChunk("r", "c", [7], [-0.5], "length", 1, [TOP]),
             StreamChunk("r", "d", [8], [-0.5], "stop", 0, [TOP])]


def test_a_stream_of_two_choices_carries_usage_once_at_its_end(tokenizer):
    s = servicer(tokenizer, N2_CHUNKS)
    req = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], n=2, top_logprobs=2, max_tokens=2)

    async def run():
        return [m async for m in s.GenerateStream(req, _Context())]
    got = asyncio.run(run())
    assert [(m.index, m.text, m.finish_reason) for m in got] == [
        (0, "a", ""), (1, "b", ""), (1, "c", "length"), (0, "d", "stop")]
    assert [m.HasField("usage") for m in got] == [False, False, False, True]
    assert (got[-1].usage.prompt_tokens, got[-1].usage.completion_tokens) == (3, 4)
    assert list(got[0].logprobs) == [-0.5]           # top_logprobs > 0: logprobs too
    [(ids, params)] = s.engine.asked
    assert ids == [1, 2, 3] and (params.n, params.top_logprobs) == (2, 2)


def test_generate_of_two_choices_answers_every_choice(tokenizer):
    s = servicer(tokenizer, N2_CHUNKS)
    req = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], n=2, max_tokens=2)
    out = asyncio.run(s.Generate(req, _Context()))
    assert [(c.index, c.text, list(c.token_ids), c.finish_reason) for c in out.choices] == [
        (0, "ad", [5, 8], "stop"), (1, "bc", [6, 7], "length")]
    assert (out.text, out.usage.completion_tokens) == ("ad", 4) and not out.logprobs


def test_a_bad_field_is_invalid_argument_before_the_engine_is_asked(tokenizer):
    s, context = servicer(tokenizer, N2_CHUNKS), _Context()
    out = asyncio.run(s.Generate(pb.GenerateRequest(prompt="hi", n=17), context))
    assert out == pb.GenerateResponse() and context.code.name == "INVALID_ARGUMENT"
    assert "n must be an integer in [1, 16]" in context.details and not s.engine.asked


CACHED = [StreamChunk("r", "a", [5], [-0.5], None, 0, cached_tokens=32),
          StreamChunk("r", "b", [6], [-0.5], "length", 1, cached_tokens=32),
          StreamChunk("r", "c", [7], [-0.5], "stop", 0, cached_tokens=48)]   # after a failover


def test_usage_carries_the_prompt_tokens_taken_from_the_prefix_cache(tokenizer):
    """Issue 23: Usage.cached_tokens on Generate (counted once for n choices) and on the
    stream's last message; after a failover, the last chunk's (the resuming engine's)."""
    c = [Completion("r", [1] * 40, [5, 6], "ab", "stop", [-0.5] * 2, i, cached_tokens=32)
         for i in range(2)]
    assert gm.Responses([1] * 40, False, tokenizer.token_bytes).unary(c).usage == pb.Usage(
        prompt_tokens=40, completion_tokens=4, cached_tokens=32)
    req = pb.GenerateRequest(prompt_token_ids=[1] * 40, n=2, max_tokens=2)

    async def stream():
        return [m async for m in servicer(tokenizer, CACHED).GenerateStream(req, _Context())]
    assert [m.usage for m in asyncio.run(stream()) if m.HasField("usage")] == [
        pb.Usage(prompt_tokens=40, completion_tokens=3, cached_tokens=48)]
    out = asyncio.run(servicer(tokenizer, CACHED).Generate(req, _Context()))
    assert out.usage == pb.Usage(prompt_tokens=40, completion_tokens=3, cached_tokens=48)
