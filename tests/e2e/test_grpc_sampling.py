"""Issue 21 over gRPC, with the real client through Serve's proxy on the shared tiny app: token-id
prompts, n > 1 (unary and streamed), top and prompt logprobs against the in-process engine's
`log_softmax(Engine.logits(...))` on the same fp32 checkpoint, every sampling option against
the in-process engine, and each bad new field refused INVALID_ARGUMENT naming it.
tests/unit/test_grpc_messages.py has the translation without Ray."""
from __future__ import annotations

import grpc
import pytest
import torch
from ray import serve

from model.engine import Engine, SamplingParams
from protos import generator_pb2 as pb

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tiny_app):
    return tiny_app.stub


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint)


def stream(server, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(server.GenerateStream(request, timeout=120))


def by_choice(messages: list[pb.GenerateResponse]) -> dict[int, list[int]]:
    """Each choice's token ids, joined over a stream's messages."""
    out: dict[int, list[int]] = {}
    for m in messages:
        out.setdefault(m.index, []).extend(m.token_ids)
    return out


def test_a_token_id_prompt_equals_its_text(server, reference):
    ids = reference.tokenizer.encode(PROMPT)
    text = server.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=8, temperature=0.0),
                           timeout=60)
    request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=8, temperature=0.0)
    got = server.Generate(request, timeout=60)
    assert (list(got.token_ids), got.text) == (list(text.token_ids), text.text)
    assert got.usage.prompt_tokens == len(ids)
    assert [t for m in stream(server, request) for t in m.token_ids] == list(text.token_ids)


def assert_alternatives(got: pb.TopLogprobs | pb.PromptLogprob, row: torch.Tensor,
                        k: int) -> None:
    """`got.alternatives` are the k most likely tokens of logprob row `row` (V,), with their
    values."""
    values, ids = row.topk(k)
    assert [a.token_id for a in got.alternatives] == ids.tolist()
    assert [a.logprob for a in got.alternatives] == pytest.approx(values.tolist(), abs=1e-4)


def test_top_and_prompt_logprobs_equal_the_engines_logits(server, reference):
    ids = reference.tokenizer.encode(PROMPT)
    request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=5, temperature=0.0,
                                 top_logprobs=3, prompt_logprobs=2)
    got = server.Generate(request, timeout=60)
    tokens = list(got.token_ids)
    rows = torch.log_softmax(reference.logits(ids + tokens[:-1]).float(), -1)  # (T + 4, V)
    chosen = rows[len(ids) - 1:].gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert list(got.logprobs) == pytest.approx(chosen.tolist(), abs=1e-4)  # implied by top_k
    assert len(got.top_logprobs) == len(tokens)
    for i, top in enumerate(got.top_logprobs):
        assert_alternatives(top, rows[len(ids) - 1 + i], 3)
    assert [p.token_id for p in got.prompt_logprobs] == ids
    assert not got.prompt_logprobs[0].HasField("logprob")
    for i, entry in enumerate(got.prompt_logprobs[1:], start=1):
        assert entry.logprob == pytest.approx(rows[i - 1, ids[i]].item(), abs=1e-4)
        assert abs(entry.rank - int((rows[i - 1] > rows[i - 1, ids[i]]).sum()) - 1) <= 1
        assert_alternatives(entry, rows[i - 1], 2)
    parts = stream(server, request)
    assert [a for m in parts for a in m.top_logprobs] == list(got.top_logprobs)
    assert list(parts[0].prompt_logprobs) == list(got.prompt_logprobs)


def test_max_tokens_0_scores_the_prompt(server, reference):
    ids = reference.tokenizer.encode(PROMPT)
    request = pb.GenerateRequest(prompt_token_ids=ids, max_tokens=0, prompt_logprobs=0)
    got = server.Generate(request, timeout=60)
    rows = torch.log_softmax(reference.logits(ids).float(), -1)               # (T, V)
    assert not got.token_ids and got.finish_reason == "length"
    assert [p.logprob for p in got.prompt_logprobs[1:]] == pytest.approx(
        rows[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(), abs=1e-4)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 0)


SAMPLED = dict(max_tokens=6, temperature=1.0, seed=21, n=3)


def test_n_choices_unary_and_streamed_equal_the_in_process_engine(server, reference):
    want = reference.generate(PROMPT, SamplingParams(**SAMPLED))          # one per choice
    request = pb.GenerateRequest(prompt=PROMPT, **SAMPLED)
    got = server.Generate(request, timeout=120)
    assert [(c.index, list(c.token_ids), c.text, c.finish_reason) for c in got.choices] == [
        (w.index, w.token_ids, w.text, w.finish_reason) for w in want]
    assert (list(got.token_ids), got.text) == (want[0].token_ids, want[0].text)
    assert got.usage.prompt_tokens == len(want[0].prompt_ids)
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    parts = stream(server, request)
    assert by_choice(parts) == {w.index: w.token_ids for w in want}
    assert len({m.index for m in parts[:3]}) > 1                 # interleaved, not one by one
    assert [m.HasField("usage") for m in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].usage.completion_tokens == got.usage.completion_tokens
    assert sorted(m.index for m in parts if m.finish_reason) == [0, 1, 2]


def test_every_sampling_option_equals_the_in_process_engine(server, reference):
    """Penalties, logit_bias, min_tokens, stop_token_ids and ignore_eos reach the sampler:
    the same output as the in-process engine given the same options, which the bias alone
    changes (a token pushed +100 is drawn whenever no penalty pulls it back)."""
    options = dict(max_tokens=8, temperature=0.7, seed=5, n=2, presence_penalty=0.5,
                   frequency_penalty=0.25, repetition_penalty=1.3, min_tokens=3,
                   ignore_eos=True)
    plain = server.Generate(pb.GenerateRequest(prompt=PROMPT, **options), timeout=120)
    stop = plain.token_ids[4]
    bias = {plain.token_ids[0] + 1: 100.0, 7: -100.0}
    want = reference.generate(PROMPT, SamplingParams(
        **options, logit_bias=bias, stop_token_ids=(stop,)))
    request = pb.GenerateRequest(prompt=PROMPT, logit_bias=bias, stop_token_ids=[stop],
                                 **options)
    got = server.Generate(request, timeout=120)
    assert [list(c.token_ids) for c in got.choices] == [w.token_ids for w in want]
    assert list(got.token_ids) != list(plain.token_ids)
    assert by_choice(stream(server, request)) == {w.index: w.token_ids for w in want}


BAD = [
    (dict(prompt="hi", n=17), "n must be an integer in [1, 16]"),
    (dict(prompt="hi", top_logprobs=21), "top_logprobs must be an integer in [0, 20]"),
    (dict(prompt="hi", prompt_logprobs=-1), "prompt_logprobs must be an integer in [0, 20]"),
    (dict(prompt="hi", presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(prompt="hi", frequency_penalty=-3), "frequency_penalty must be in [-2, 2]"),
    (dict(prompt="hi", repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
    (dict(prompt="hi", logit_bias={32000: 1}), "logit_bias: token ids must be in [0, 32000)"),
    (dict(prompt="hi", logit_bias={5: -101}), "logit_bias values must be in [-100, 100]"),
    (dict(prompt="hi", logit_bias={i: 1 for i in range(301)}), "logit_bias must hold at most 300"),
    (dict(prompt="hi", max_tokens=3, min_tokens=4), "min_tokens must be an integer in [0, max"),
    (dict(prompt="hi", stop_token_ids=[-1]), "stop_token_ids: token ids must be in [0, 32000)"),
    (dict(prompt_token_ids=[1, 32000]), "prompt_token_ids: prompt token ids must be integers"),
    (dict(prompt="hi", prompt_token_ids=[1]), "set exactly one of prompt, messages and prompt_t"),
    (dict(prompt="hi", max_tokens=0), "max_tokens must be in [1,"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_each_bad_field_is_invalid_argument_naming_it(server, tiny_app, fields, message):
    for call in (server.Generate, lambda r, timeout: stream(server, r)):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.GenerateRequest(**fields), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert message in err.value.details()
    engine = serve.get_deployment_handle("EngineServer", app_name=tiny_app.name)
    info = engine.info.remote().result(timeout_s=60)
    assert info.free_blocks == info.total_blocks                  # nothing of it was queued


def test_client_cli_prints_choices_and_alternatives(server, grpc_port, reference, capsys):
    from protos.client import main
    ids = reference.tokenizer.encode(PROMPT)
    want = reference.generate([ids], SamplingParams(max_tokens=3, temperature=0.0, n=2))
    argv = ["--prompt-token-ids", ",".join(map(str, ids)), "--n", "2", "--max-tokens", "3",
            "--top-logprobs", "2", "--prompt-logprobs", "1", "--address", f"127.0.0.1:{grpc_port}"]
    for mode in ([], ["--unary"]):
        assert main(argv + mode) == 0
        out = capsys.readouterr().out
        for w in want:
            assert f"[choice {w.index}]\n{w.text}\n[finish_reason=length tokens=3]\n" in out
            assert f"  {w.token_ids[0]}: " in out
        assert f"[prompt_tokens={len(ids)} completion_tokens=6 cached_tokens=0]" in out
        assert f"[prompt_logprobs {ids[0]}:- {ids[1]}:" in out
