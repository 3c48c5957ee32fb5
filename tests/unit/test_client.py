"""protos/client.py against an in-process gRPC server with a fake Generator (no Ray): prompts
from a file or stdin, and a reader that closes the pipe early (`| head -1`) ends it quietly.
tests/e2e/test_grpc.py runs the same client against the real server."""
from __future__ import annotations

import io
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from protos import client
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

ALTERNATIVES = pb.TopLogprobs(alternatives=[
    pb.TokenLogprob(token_id=1526, logprob=-0.25, token=b" world"),
    pb.TokenLogprob(token_id=13, logprob=-2.5, token=b"\n")])
PROMPT_LOGPROBS = [pb.PromptLogprob(token_id=1),
                   pb.PromptLogprob(token_id=22557, logprob=-3.5,
                                    alternatives=ALTERNATIVES.alternatives)]


class _Echo(pb_grpc.GeneratorServicer):
    """Streams "ok " three times (with n > 1: two choices, interleaved, with alternatives and
    prompt logprobs); ModelInfo lists many experts (a long output)."""

    def __init__(self):
        self.prompts: list[str] = []
        self.requests: list[pb.GenerateRequest] = []
        self.info: pb.ModelInfoResponse | None = None     # ModelInfo's reply, if not the default

    def GenerateStream(self, request, context):
        self.requests.append(request)
        if request.n > 1:
            yield from _two_choices()
            return
        if request.tools:
            yield from TOOL_CALL_STREAM
            return
        self.prompts.append(request.prompt or request.messages[-1].content)
        for _ in range(3):
            yield pb.GenerateResponse(text="ok ", token_ids=[1])
        yield pb.GenerateResponse(finish_reason="length", usage=pb.Usage(
            prompt_tokens=40, completion_tokens=3, cached_tokens=32))

    def Generate(self, request, context):
        self.requests.append(request)
        if request.prompt == "big":             # past gRPC's default 4 MiB receive limit
            return pb.GenerateResponse(text="x" * (5 << 20), finish_reason="length")
        choices = [pb.Choice(index=0, text="ab", token_ids=[5, 6], logprobs=[-0.5, -0.75],
                             top_logprobs=[ALTERNATIVES] * 2, finish_reason="length"),
                   pb.Choice(index=1, text="c", token_ids=[7], logprobs=[-1.0],
                             top_logprobs=[ALTERNATIVES], finish_reason="stop")]
        return pb.GenerateResponse(text="ab", token_ids=[5, 6], logprobs=[-0.5, -0.75],
                                   top_logprobs=[ALTERNATIVES] * 2, finish_reason="length",
                                   usage=pb.Usage(prompt_tokens=2, completion_tokens=3),
                                   prompt_logprobs=PROMPT_LOGPROBS, choices=choices)

    def ModelInfo(self, request, context):
        if self.info is not None:
            return self.info
        experts = [pb.ExpertPlacement(expert_id=e, node_ids=[f"node{e}"]) for e in range(5000)]
        return pb.ModelInfoResponse(model="tiny", num_experts=5000, experts=experts)


# a call streamed as the server sends one: id and name first, then its argument pieces
TOOL_CALL_STREAM = [
    pb.GenerateResponse(tool_calls=[pb.ToolCall(id="AbC123xyZ", name="get_weather")]),
    pb.GenerateResponse(tool_calls=[pb.ToolCall(arguments='{"city": ')]),
    pb.GenerateResponse(tool_calls=[pb.ToolCall(arguments='"Paris"}')], finish_reason="tool_calls",
                        usage=pb.Usage(prompt_tokens=9, completion_tokens=8))]


def _two_choices():
    """A stream of two choices as the server sends one: deltas by index, usage at the end."""
    def delta(index, text, token, logprob, reason=""):
        return pb.GenerateResponse(index=index, text=text, token_ids=[token], logprobs=[logprob],
                                   top_logprobs=[ALTERNATIVES], finish_reason=reason)
    first = delta(0, "a", 5, -0.5)
    first.prompt_logprobs.extend(PROMPT_LOGPROBS)
    yield first
    yield delta(1, "c", 7, -1.0, "stop")
    last = delta(0, "b", 6, -0.75, "length")
    last.usage.CopyFrom(pb.Usage(prompt_tokens=2, completion_tokens=3))
    yield last


@pytest.fixture(scope="module")
def fake_server():
    """(address, servicer) of a fake Generator on a free local port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _Echo()
    pb_grpc.add_GeneratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_a_200_kb_prompt_from_a_file_or_stdin(fake_server, tmp_path, monkeypatch, capsys):
    address, servicer = fake_server
    prompt = "Once upon a time. " * 11_200                 # ~200 KB: too long for an argument
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    assert client.main(["--prompt-file", str(path), "--address", address]) == 0
    assert servicer.prompts[-1] == prompt
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    assert client.main(["-", "--chat", "--address", address]) == 0
    assert servicer.prompts[-1] == prompt
    assert "prompt_tokens=40 completion_tokens=3 cached_tokens=32]" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "a prompt is required"),
    (["Hi", "--prompt-file", "p.txt"], "not both"),
    (["--prompt-file", "/no/such/file"], "--prompt-file: cannot read"),
])
def test_a_missing_or_doubled_prompt_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        client.main(argv + ["--address", "127.0.0.1:1"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["info"], ["Hello", "--max-tokens", "3"]])
def test_a_reader_that_closes_the_pipe_early_ends_it_quietly(fake_server, args):
    """As `python -m protos.client info | head -1`: no BrokenPipeError traceback."""
    address, _ = fake_server
    proc = subprocess.Popen([sys.executable, "-m", "protos.client", *args, "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()                                   # the reader goes away
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def shared_pool_info() -> pb.ModelInfoResponse:
    """ModelInfo as one of two engine replicas on a shared pool of 2 experts answers it."""
    own = [pb.ExpertPlacement(expert_id=0, node_ids=["n1"], rows_per_second=10.0),
           pb.ExpertPlacement(expert_id=1, node_ids=["n2"], rows_per_second=6.0)]
    pool = pb.ExpertPool(
        name="mixtral-ep-pool:app:1a2b", generation=17, frontends=2, actor_imbalance=1.25,
        experts=[pb.ExpertPlacement(expert_id=0, node_ids=["n1", "n3"], rows_per_second=21.0),
                 pb.ExpertPlacement(expert_id=1, node_ids=["n2"], rows_per_second=11.5)],
        actors=[pb.PoolActor(expert_ids=[e], node_id=n) for e, n in [(0, "n1"), (0, "n3"),
                                                                      (1, "n2")]],
        merges=pb.MergeStats(calls=400, computes=300, merged_calls=120, rows=1050))
    return pb.ModelInfoResponse(
        model="tiny", num_experts=2, experts_per_token=1, frontend_node_id="n0", experts=own,
        pool=pool, frontend=pb.FrontendStats(expert_call_retries=3, kv_blocks_free=10,
                                             kv_blocks_total=20, tracked_requests=2))


def test_info_prints_the_shared_pool_and_labels_the_replicas_own_figures(fake_server, capsys):
    address, servicer = fake_server
    servicer.info = shared_pool_info()
    try:
        assert client.main(["info", "--address", address]) == 0
    finally:
        servicer.info = None
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "this engine replica: 3 expert call retries, KV blocks 10/20 free, 2 requests; "
        "its expert calls:",
        "  expert 0: 1 replica(s) on n1; 10.0 rows/s from this replica recently",
        "  expert 1: 1 replica(s) on n2; 6.0 rows/s from this replica recently",
        "shared expert pool mixtral-ep-pool:app:1a2b: generation 17, 2 engine replica(s) "
        "polling, 3 actor(s), imbalance 1.25 (max / mean rows/s)",
        "  expert 0: 2 actor(s) on n1, n3; 21.0 rows/s from all replicas",
        "  expert 1: 1 actor(s) on n2; 11.5 rows/s from all replicas",
        "  merges: 120 of 400 calls computed with another's (30%), 300 computes, "
        "3.5 rows per GEMM"]


def test_info_without_a_pool_prints_no_pool_block():
    """expert_pool: per_replica (or an older server): no `pool`, no `frontend` in the reply."""
    info = shared_pool_info()
    info.ClearField("pool")
    info.ClearField("frontend")
    lines = client.info_lines(info)
    assert lines[1] == "this engine replica; its expert calls:" and len(lines) == 4
    assert not any("pool" in line for line in lines)
    idle = pb.ExpertPool(name="p")                      # no calls yet: no division by zero
    assert client.pool_lines(idle)[-1].endswith("(0%), 0 computes, 0.0 rows per GEMM")


def test_info_prints_the_precision():
    """Issue 25: the compute dtype and the weights' quantization ("" is unquantized); a server
    from before them (no dtype) gets no precision."""
    info = shared_pool_info()
    assert not client.info_lines(info)[0].endswith("weights")
    info.dtype, info.quantization = "bfloat16", "fp8"
    assert client.info_lines(info)[0].endswith("; frontend on node n0; bfloat16 compute, "
                                                "fp8 weights")
    info.dtype, info.quantization = "float32", ""
    assert client.info_lines(info)[0].endswith("; float32 compute, unquantized weights")


NEW_FLAGS = ["--n", "2", "--top-logprobs", "2", "--prompt-logprobs", "1", "--presence-penalty",
             "0.5", "--frequency-penalty", "-1", "--repetition-penalty", "1.25", "--logit-bias",
             "13=-100", "--logit-bias", "7=2.5", "--min-tokens", "1", "--stop-token-id", "13",
             "--stop-token-id", "2", "--ignore-eos", "--seed", "3", "--cache-salt", "tenant-a"]


def test_every_sampling_flag_reaches_the_request():
    args = client.parser().parse_args(["--prompt-token-ids", "1,22557", *NEW_FLAGS])
    assert client.request_from_args(args) == pb.GenerateRequest(
        prompt_token_ids=[1, 22557], max_tokens=64, temperature=0.0, top_p=1.0, top_k=0, n=2,
        top_logprobs=2, prompt_logprobs=1, presence_penalty=0.5, frequency_penalty=-1,
        repetition_penalty=1.25, logit_bias={13: -100, 7: 2.5}, min_tokens=1,
        stop_token_ids=[13, 2], ignore_eos=True, seed=3, cache_salt="tenant-a")


def test_without_the_new_flags_the_request_is_as_before():
    req = client.request_from_args(client.parser().parse_args(["Hi"]))
    assert req == pb.GenerateRequest(prompt="Hi", max_tokens=64, temperature=0.0, top_p=1.0,
                                     top_k=0)
    assert not any(req.HasField(f) for f in ("n", "top_logprobs", "prompt_logprobs", "seed",
                                             "min_tokens", "repetition_penalty"))


@pytest.mark.parametrize("argv, message", [
    (["--logit-bias", "13"], "is not ID=BIAS"),
    (["--logit-bias", "x=1"], "invalid"),
    (["--prompt-token-ids", "1,x"], "invalid"),
    (["--stop-token-id", str(2**31)], "int32"),
    (["--prompt-token-ids", "1", "Hi"], "--prompt-token-ids is the whole prompt"),
    (["--prompt-token-ids", "1", "--chat"], "--prompt-token-ids is the whole prompt"),
])
def test_bad_sampling_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        client.main(argv + ["--address", "127.0.0.1:1"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("unary", [False, True])
def test_choices_are_printed_by_index_with_their_alternatives(fake_server, unary, capsys):
    address, servicer = fake_server
    argv = ["--prompt-token-ids", "1,22557", *NEW_FLAGS, "--address", address]
    assert client.main(argv + (["--unary"] if unary else [])) == 0
    assert list(servicer.requests[-1].prompt_token_ids) == [1, 22557]
    out = capsys.readouterr().out
    assert out.startswith("[choice 0]\nab\n[finish_reason=length tokens=2]\n"
                          "[logprobs 5:-0.5000 6:-0.7500]\n[top_logprobs]\n"
                          "  5: 1526' world':-0.2500 13'\\n':-2.5000\n")
    assert "[choice 1]\nc\n[finish_reason=stop tokens=1]\n[logprobs 7:-1.0000]\n" in out
    assert "[prompt_tokens=2 completion_tokens=3 cached_tokens=0]\n" in out
    assert out.endswith("[prompt_logprobs 1:- 22557:-3.5000]\n"
                        "  22557: 1526' world':-0.2500 13'\\n':-2.5000\n")


def test_a_unary_reply_past_4_mib_is_read(fake_server, capsys):
    """n choices with 20 alternatives per token pass gRPC's default client limit at ~12,000
    tokens: the CLI's channel takes any size."""
    address, _ = fake_server
    assert client.main(["big", "--unary", "--address", address]) == 0
    assert "x" * (5 << 20) in capsys.readouterr().out


WEATHER = ('{"type": "function", "function": {"name": "get_weather", "parameters": '
           '{"type": "object", "properties": {"city": {"type": "string"}}}}}')


@pytest.mark.parametrize("flags, fields", [
    (["--json-schema", '{"type": "object"}'], {"json_schema": '{"type": "object"}'}),
    (["--regex", "[0-9]+"], {"regex": "[0-9]+"}),
    (["--choice", "yes", "--choice", "no"], {"choice": pb.ChoiceConstraint(values=["yes", "no"])}),
    (["--grammar", "start: /[a-z]+/"], {"grammar": "start: /[a-z]+/"}),
    (["--json-object"], {"json_object": True}),
])
def test_each_constraint_flag_fills_the_oneof(flags, fields):
    req = client.request_from_args(client.parser().parse_args(["Hi", *flags]))
    assert req == pb.GenerateRequest(prompt="Hi", max_tokens=64, temperature=0.0, top_p=1.0,
                                     top_k=0, **fields)


@pytest.mark.parametrize("flag, field", [("--regex", "regex"), ("--json-schema", "json_schema"),
                                         ("--grammar", "grammar")])
def test_at_at_is_text_that_begins_with_an_at_sign(flag, field):
    """Every @-file flag reads "@@..." as the text "@..." (documented in --help), not a file."""
    args = client.parser().parse_args(["Hi", flag, "@@[a-z]+"])
    assert getattr(client.request_from_args(args), field) == "@[a-z]+"
    assert '"@@..." for text that begins with "@"' in " ".join(
        client.parser().format_help().split())


def test_a_file_value_and_the_tool_flags_reach_the_request(tmp_path):
    schema, tool = tmp_path / "schema.json", tmp_path / "tool.json"
    schema.write_text('{"type": "integer"}', encoding="utf-8")
    tool.write_text(WEATHER, encoding="utf-8")
    args = client.parser().parse_args(
        ["Weather?", "--json-schema", f"@{schema}", "--tool", f"@{tool}", "--tool", WEATHER,
         "--tool-choice", "get_weather", "--no-parallel-tool-calls"])
    req = client.request_from_args(args)
    assert req.json_schema == '{"type": "integer"}' and list(req.tools) == [WEATHER, WEATHER]
    assert [(m.role, m.content) for m in req.messages] == [("user", "Weather?")]   # implies chat
    assert (req.tool_choice, req.HasField("parallel_tool_calls"), req.parallel_tool_calls) == (
        "get_weather", True, False)
    plain = client.request_from_args(client.parser().parse_args(["Hi", "--tool", WEATHER]))
    assert not plain.HasField("parallel_tool_calls") and not plain.tool_choice


@pytest.mark.parametrize("argv, message", [
    (["Hi", "--regex", "a", "--choice", "a"], "argument --choice: not allowed with argument "
                                              "--regex"),
    (["Hi", "--json-object", "--json-schema", "{}"], "not allowed with argument --json-object"),
    (["Hi", "--json-schema", "@/no/such/file"], "argument --json-schema: cannot read"),
    (["Hi", "--grammar", "@/no/such/file"], "argument --grammar: cannot read"),
    (["Hi", "--tool", "{not json"], "argument --tool: '{not json' is not JSON text"),
    (["Hi", "--tool", "[1]"], "argument --tool: '[1]' is not a JSON object"),
    (["Hi", "--tool", "[" * 5000], "argument --tool: '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[' "
                                   "is JSON nested too deeply"),
    (["--prompt-token-ids", "1", "--tool", "{}"], "--prompt-token-ids is the whole prompt"),
])
def test_bad_structured_flags_are_usage_errors_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        client.main(argv + ["--address", "127.0.0.1:1"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_streamed_tool_call_is_printed_whole(fake_server, capsys):
    address, servicer = fake_server
    assert client.main(["Weather?", "--tool", WEATHER, "--tool-choice", "required",
                        "--address", address]) == 0
    assert servicer.requests[-1].tool_choice == "required"
    assert capsys.readouterr().out == (
        '\n[tool_call 0 id=AbC123xyZ get_weather({"city": "Paris"})]\n'
        "[finish_reason=tool_calls prompt_tokens=9 completion_tokens=8 cached_tokens=0]\n")
