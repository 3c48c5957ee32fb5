"""Real Serve with its gRPC proxy on a free port, a real gRPC client, the tiny checkpoint."""
from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from model.engine import Engine, SamplingParams
from protos import generator_pb2 as pb

PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):"]


@pytest.fixture(scope="module")
def server(tiny_app):
    assert tiny_app.name == "mixtral-ep"    # the app the tests below name (conftest: TINY_APP)
    return tiny_app.stub


@pytest.fixture(scope="module")
def address(server, grpc_port) -> str:
    """host:port of Serve's gRPC proxy, once the module's app runs."""
    return f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint)


def greedy(prompt: str, max_tokens: int = 20) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0)


def test_unary_and_stream_equal_the_in_process_engine(server, reference):
    for prompt in PROMPTS:
        want = reference.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0))[0]
        unary = server.Generate(greedy(prompt), timeout=60)
        assert list(unary.token_ids) == want.token_ids and unary.text == want.text
        assert unary.finish_reason == want.finish_reason
        assert unary.usage.prompt_tokens == len(want.prompt_ids)
        assert unary.usage.completion_tokens == len(want.token_ids)
        parts = list(server.GenerateStream(greedy(prompt), timeout=60))
        assert "".join(p.text for p in parts) == unary.text
        assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
        assert (parts[-1].finish_reason == unary.finish_reason
                and parts[-1].usage.completion_tokens == 20)


def test_chat_messages_use_the_chat_template(server, reference):
    messages = [pb.ChatMessage(role="user", content="Hi there")]
    ids = reference.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    want = reference.generate([ids], SamplingParams(max_tokens=8, temperature=0.0))[0]
    got = server.Generate(pb.GenerateRequest(messages=messages, max_tokens=8, temperature=0.0,
                                             logprobs=True), timeout=60)
    assert list(got.token_ids) == want.token_ids and got.usage.prompt_tokens == len(ids)
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(prompt="a", messages=[pb.ChatMessage(role="user", content="b")]), "prompt"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="bot", content="b")]), "messages[0].role"),
    (pb.GenerateRequest(prompt="x " * 5000), "context length"),
    (pb.GenerateRequest(prompt="hi", max_tokens=0), "max_tokens"),
    (pb.GenerateRequest(prompt="hi", max_tokens=100000), "max_tokens"),
    (pb.GenerateRequest(prompt="hi", temperature=-1), "temperature"),
    (pb.GenerateRequest(prompt="hi", top_p=0), "top_p"),
    (pb.GenerateRequest(prompt="hi", top_p=1.5), "top_p"),
    (pb.GenerateRequest(prompt="hi", top_k=-3), "top_k"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_requests_get_invalid_argument_naming_the_field(server, request_, field):
    for call in (server.Generate,
                 lambda r, timeout: list(server.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert field in err.value.details() and "Traceback" not in err.value.details()
    assert server.Generate(greedy("still serving", 2), timeout=60).usage.completion_tokens == 2


def test_32_concurrent_streams_complete_correctly(server, reference):
    prompts = [f"Request number {i} says" for i in range(32)]
    want = reference.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))

    def run(prompt):
        parts = list(server.GenerateStream(greedy(prompt, 12), timeout=120))
        return [t for p in parts for t in p.token_ids], "".join(p.text for p in parts)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(run, prompts))
    assert [g[0] for g in got] == [w.token_ids for w in want]
    assert [g[1] for g in got] == [w.text for w in want]


def test_a_tiny_temperature_is_greedy_beside_its_neighbours(server, reference):
    """temperature=1e-40 once made the sampler divide to inf -> NaN and fail the whole step."""
    want = reference.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))

    def run(prompt):
        request = pb.GenerateRequest(prompt=prompt, max_tokens=12, temperature=1e-40, seed=3)
        return list(server.Generate(request, timeout=120).token_ids)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(run, PROMPTS)) == [w.token_ids for w in want]


def test_model_info(server, ray_cluster):
    info = server.ModelInfo(pb.ModelInfoRequest(), timeout=60)
    assert info.num_experts == 8 and info.experts_per_token == 2 and info.vocab_size == 32000
    assert sorted(e.expert_id for e in info.experts) == list(range(8))
    expert_nodes = {n.node_id for n in ray_cluster.worker_nodes}
    assert all(set(e.node_ids) <= expert_nodes for e in info.experts)
    assert info.context_length == 4096
    assert info.frontend_node_id == ray_cluster.head_node.node_id   # frontend_resources: the head
    assert (info.dtype, info.quantization) == ("float32", "")      # issue 25: fp32, unquantized



def test_model_info_shows_the_shared_pool_once_and_this_frontends_own_figures(
        server, ray_cluster, alive_actors):
    """Issue 24 (the app's default `expert_pool: shared`): ModelInfo's `pool` is the one
    ExpertPoolServer's: its 8 actors (the ExpertWorker actors alive, by actor id, one per expert
    id, on the expert nodes), the one engine replica polling it, the rows it routed summed, and
    the calls its actors served; `frontend` is the answering replica's own (idle: every KV
    block free), and its `experts` are the pool's actors."""
    server.Generate(greedy("Once upon a time", 8), timeout=60)
    deadline = time.monotonic() + 20

    def settled(info) -> bool:
        """The request's KV blocks freed, and its load in the pool's (a frontend's load
        reaches the pool with its next long poll: within SYNC_WAIT_S)."""
        return (info.frontend.kv_blocks_free == info.frontend.kv_blocks_total
                and sum(e.rows_per_second for e in info.pool.experts) > 0)
    while not settled(info := server.ModelInfo(pb.ModelInfoRequest(), timeout=60)):
        assert time.monotonic() < deadline, f"not settled: {info}"
        time.sleep(0.2)
    pool = info.pool
    assert pool.name.startswith("mixtral-ep-pool:mixtral-ep:")
    assert pool.frontends == 1
    workers = {a["ActorID"]: a["Address"]["NodeID"] for a in alive_actors("ExpertWorker")}
    assert {a.actor_id: a.node_id for a in pool.actors} == workers
    assert sorted(e for a in pool.actors for e in a.expert_ids) == list(range(8))
    expert_nodes = {n.node_id for n in ray_cluster.worker_nodes}
    assert {a.node_id for a in pool.actors} <= expert_nodes
    assert [(e.expert_id, sorted(e.node_ids)) for e in pool.experts] == \
        [(e.expert_id, sorted(e.node_ids)) for e in info.experts]
    assert sum(a.rows_per_second for a in pool.actors) > 0 and pool.actor_imbalance >= 1
    m = pool.merges
    assert 0 < m.computes <= m.calls and m.merged_calls <= m.calls and m.rows > 0
    f = info.frontend
    assert f.kv_blocks_total > 0 and f.tracked_requests == 0 and f.expert_call_retries == 0

def test_model_info_shows_live_scaled_replicas_and_load(server, engine_actors):
    """The served engine scales an expert live (EngineServer.set_expert_replicas, through its
    deployment handle) while a stream runs; ModelInfo shows the replicas on distinct nodes and
    each expert's recent load; the stream's output is unchanged; scaling back frees the actor."""
    request = pb.GenerateRequest(prompt="Once upon a time", max_tokens=24, temperature=0.0)
    want = list(server.Generate(request, timeout=120).token_ids)
    engine = serve.get_deployment_handle("EngineServer", app_name="mixtral-ep")
    call = server.GenerateStream(request, timeout=120)
    got = list(next(call).token_ids)
    assert engine.set_expert_replicas.remote({5: 2}).result(timeout_s=120)[5] == 2
    got += [t for part in call for t in part.token_ids]
    assert got == want
    info = server.ModelInfo(pb.ModelInfoRequest(), timeout=60)
    [five] = [e for e in info.experts if e.expert_id == 5]
    assert len(five.node_ids) == 2 and len(set(five.node_ids)) == 2
    assert sum(e.rows_per_second for e in info.experts) > 0
    assert len(engine_actors("mixtral-ep")[1]) == 9
    assert engine.set_expert_replicas.remote({5: 1}).result(timeout_s=120)[5] == 1
    deadline = time.monotonic() + 30
    while len(engine_actors("mixtral-ep")[1]) != 8:
        assert time.monotonic() < deadline, "the removed replica is still alive"
        time.sleep(0.5)


def test_the_engine_replica_is_the_frontend_and_its_pool_holds_the_experts(server, alive_actors,
                                                                           engine_actors):
    """No frontend actor between the replica and its engine: the replica runs the engine and
    the dispatcher itself; the application's shared pool (the default) holds the 8 expert
    actors it uses, and no others run."""
    replica, owned = engine_actors("mixtral-ep")
    assert not alive_actors("Frontend")
    assert len(owned) == 8 and len(alive_actors("ExpertWorker")) == 8
    info = server.ModelInfo(pb.ModelInfoRequest(), timeout=60)
    assert info.frontend_node_id == replica["Address"]["NodeID"]
    assert sorted(n for e in info.experts for n in e.node_ids) == \
        sorted(a["Address"]["NodeID"] for a in owned)


def test_a_cancelled_stream_frees_its_kv_blocks(server):
    engine = serve.get_deployment_handle("EngineServer", app_name="mixtral-ep")
    start = engine.info.remote().result()
    assert start.free_blocks == start.total_blocks
    call = server.GenerateStream(pb.GenerateRequest(prompt="a long story " * 40, max_tokens=2000,
                                                    temperature=0.0), timeout=120)
    for i, _ in enumerate(call):
        if i == 3:
            break
    assert engine.info.remote().result().free_blocks < start.free_blocks
    call.cancel()
    deadline = time.monotonic() + 20
    while engine.info.remote().result().free_blocks != start.free_blocks:
        assert time.monotonic() < deadline, "the cancelled request kept its KV blocks"
        time.sleep(0.2)


def test_a_passed_deadline_ends_the_call_and_frees_its_blocks(server):
    engine = serve.get_deployment_handle("EngineServer", app_name="mixtral-ep")
    start = engine.info.remote().result().free_blocks
    long = pb.GenerateRequest(prompt="a long story " * 40, max_tokens=3000, temperature=0.0)
    for call in (lambda: list(server.GenerateStream(long, timeout=1.5)),
                 lambda: server.Generate(long, timeout=1.5)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while engine.info.remote().result().free_blocks != start:
        assert time.monotonic() < deadline, "requests past their deadline kept their KV blocks"
        time.sleep(0.2)


def test_readme_client_code_runs(server, address, readme_code, monkeypatch, capsys):
    monkeypatch.setenv("MIXTRAL_EP_ADDRESS", address)
    code = readme_code("Calling it from a Python service")
    exec(compile(code, "README.md (Calling it from a Python service)", "exec"), {})
    assert re.search(r" (length|stop) \d+\n", capsys.readouterr().out)   # the unary reply's line


def test_grpc_health_check_through_the_proxy(server, address):
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mixtral_ep.v1.Generator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_cli_streams_calls_unary_chat_and_info(server, address, reference, capsys):
    from protos.client import main
    want = reference.generate("Hello", SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert main(["Hello", "--address", address, "--max-tokens", "6", "--logprobs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(want.text) and "completion_tokens=6 cached_tokens=0]" in out
    assert f"[logprobs {want.token_ids[0]}:" in out
    assert main(["Hi", "--address", address, "--system", "Be brief.", "--unary", "--top-k", "5",
                 "--max-tokens", "4", "--stop", "zzz"]) == 0
    assert "completion_tokens=" in capsys.readouterr().out
    assert main(["info", "--address", address]) == 0
    out = capsys.readouterr().out
    assert "expert 7: 1 replica(s)" in out
    assert "shared expert pool mixtral-ep-pool:mixtral-ep:" in out and "8 actor(s)" in out
    assert main(["Hello", "--address", address, "--top-p", "2"]) == 1
    assert "INVALID_ARGUMENT: top_p must be in (0, 1]" in capsys.readouterr().err


def test_client_cli_ctrl_c_ends_quietly(server, address, sigint_reaches_children):
    # greedy and long: an unseeded sample could end early (EOS) before the signal lands
    proc = subprocess.Popen([sys.executable, "-m", "protos.client", "Once upon a time",
                             "--address", address, "--max-tokens", "2000", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.read(1)                       # the stream has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err


def test_a_client_error_is_one_quiet_log_line(server, address, http_port, alive_actors):
    """A bad request over a stream, a unary call and HTTP, a passed deadline, a cancelled
    stream and HTTP SSE clients that leave mid-stream: one INFO line each in the gateway's log,
    no traceback and no ERROR line from the gateway replicas or Serve's proxy (their logs and
    their stderr, where asyncio reports an exception nobody retrieved)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    sizes = {f: f.stat().st_size for f in logs.glob("*.log")}
    bad = pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="x")])
    for call in (server.Generate,
                 lambda r, timeout: list(server.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    model = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models",
                                              timeout=30).read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "hi", "best_of": 3}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=30)
    pids = [a["Pid"] for a in alive_actors("ProxyActor")
            + alive_actors("ServeReplica:mixtral-ep:Gateway")]
    err_logs = [f for pid in pids for f in logs.parent.glob(f"worker-*-{pid}.err")]
    assert len(err_logs) >= 2
    err_sizes = {f: f.stat().st_size for f in err_logs}
    long = pb.GenerateRequest(prompt="Once", max_tokens=500, temperature=0.0)
    for deadline in (0.05, 0.3, 0.05, 0.3):           # deadlines that pass mid-request
        with pytest.raises(grpc.RpcError) as err:
            server.Generate(long, timeout=deadline)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = server.GenerateStream(long, timeout=60)  # a client that leaves mid-stream
        next(stream)
        stream.cancel()
    sse = json.dumps({"model": model, "prompt": "Once", "max_tokens": 500, "temperature": 0,
                      "stream": True}).encode()
    for _ in range(12):                               # SSE clients that leave mid-stream
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/completions", data=sse,
                headers={"Content-Type": "application/json"}), timeout=30) as response:
            response.readline()
    time.sleep(5)              # Serve's log files are written async; asyncio reports at GC
    new = "".join(f.read_bytes()[sizes.get(f, 0):].decode(errors="replace")
                  for f in sorted(logs.glob("*.log")))
    new += "".join(f.read_bytes()[err_sizes[f]:].decode(errors="replace") for f in err_logs)
    assert "Traceback" not in new and " ERROR " not in new, new[-3000:]
    assert new.count("request answered INVALID_ARGUMENT: set exactly one of prompt") == 2
    assert new.count("request answered 400: best_of: only 1 is supported") == 1   # HTTP's words


def test_a_finished_request_writes_one_access_line_and_no_disconnect(server, http_port):
    """Serve's proxy writes a request's one access line, the gateway and the engine replica
    none of their own; a stream read to its end ([DONE], after which the OpenAI SDK's sync
    client closes) is not reported as a disconnect ("Client for request ... disconnected,
    cancelling request")."""
    openai = pytest.importorskip("openai")
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    sizes = {f: f.stat().st_size for f in logs.glob("*.log")}
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                           max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    for _ in range(5):
        assert list(client.completions.create(model=model, prompt="Hi", max_tokens=4,
                                              stream=True))
    client.completions.create(model=model, prompt="Hi", max_tokens=4)
    list(server.GenerateStream(greedy("Hi", 4), timeout=60))
    server.Generate(greedy("Hi", 4), timeout=60)
    time.sleep(5)                                  # Serve's log files are written async
    new = "".join(f.read_bytes()[sizes.get(f, 0):].decode(errors="replace")
                  for f in sorted(logs.glob("*.log")))
    assert "disconnected" not in new, new[-3000:]
    assert new.count("POST /v1/completions 200") == 6, new[-3000:]       # the proxy's lines
    assert new.count("Generator/GenerateStream") == new.count("Generator/Generate ") == 1
    gateway = [line for line in new.splitlines()
               if "_Gateway " in line and ("/v1/" in line or "Generate" in line)]
    assert not gateway, gateway
    engine = [line for line in new.splitlines() if "_EngineServer " in line and "CALL " in line]
    assert not engine, engine
