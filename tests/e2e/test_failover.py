"""No request lost when the engine replica (the frontend: it holds the KV cache) dies: the gateway
re-sends each request in flight as prompt + tokens so far (actors/failover.py), and every
client's stream, over gRPC and over the OpenAI HTTP API, streaming and unary, greedy and seeded,
ends exactly as an undisturbed run; with n choices, each choice (its tokens, text and top
logprobs) does. Past the failover bound, the client gets UNAVAILABLE. What
the replica leaves behind survives it too: the request metrics count the disturbed run as the
undisturbed one, and expert replicas set by hand are restored on the new replica."""
from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time

import grpc
import openai
import pytest
from ray import serve

from cluster.local import EXPERT_SLOT, FRONTEND_SLOT
from deploy.app import build_app
from protos import generator_pb2 as pb
from tests.choices import Choices, assert_same_choices
from tests.e2e.prometheus import settled, total, until_equal

APP = "mixtral-ep-failover"
MAX_TOKENS = 64
# what a request adds to the gateway's metrics, however many engine replicas served it
REQUEST_COUNTERS = ("ray_mixtral_ep_prompt_tokens_total", "ray_mixtral_ep_generation_tokens_total",
                    "ray_mixtral_ep_time_to_first_token_seconds_count",
                    "ray_mixtral_ep_inter_token_latency_seconds_count",
                    "ray_mixtral_ep_e2e_request_latency_seconds_count",
                    "ray_mixtral_ep_request_success_total")
ARGS = {"expert_resources": EXPERT_SLOT, "frontend_resources": FRONTEND_SLOT,
        "frontend_threads": 1, "expert_threads": 1,
        "experts_per_actor": 4}     # 2 expert actors: the failover is the gateway's, and quicker


@pytest.fixture(scope="module")
def server(deploy, tiny_checkpoint):
    return deploy(APP, {"model": str(tiny_checkpoint), **ARGS})


@pytest.fixture(scope="module")
def client(server, http_port):
    models = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                           max_retries=0, timeout=300)
    return models


def grpc_prompt_logprobs(entries) -> list | None:
    """A message's prompt_logprobs as tests/choices.py keeps them; None when it has none."""
    return [(e.logprob, [(a.token_id, a.logprob) for a in e.alternatives])
            if e.HasField("logprob") else None for e in entries] or None


def grpc_top(entries) -> list:
    return [[(a.token_id, a.logprob) for a in top.alternatives] for top in entries]


def http_top(logprobs) -> tuple[list[float], list]:
    """A chat choice's logprobs object -> (the tokens' logprobs, their alternatives)."""
    content = logprobs.content if logprobs is not None else []
    return ([e.logprob for e in content],
            [[(a.token, a.logprob) for a in e.top_logprobs] for e in content])


def http_stream(client, chat: bool, prompt, **sampling):
    """A job (see `jobs`) streaming a completion or a chat over the OpenAI HTTP API."""
    def run(started):
        kw = {"model": client.models.list().data[0].id, "max_tokens": MAX_TOKENS,
              "stream": True, **sampling,
              "extra_body": {"return_token_ids": True, **sampling.get("extra_body", {})}}
        if chat:
            chunks = client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **kw)
        else:
            chunks = client.completions.create(prompt=prompt, **kw)
        got = Choices()
        for n, chunk in enumerate(chunks, start=1):
            for choice in chunk.choices:
                text = (choice.delta.content or "") if chat else choice.text
                got.add(choice.index, choice.token_ids, text,
                        *(http_top(choice.logprobs) if chat else ()))
            if n == 3:
                started.set()
        return got
    return run


def jobs(stub, client) -> dict:
    """name -> job(started) -> Choices (tests/choices.py); `started` is set once a stream has 3
    chunks (unary calls set it when sent)."""
    model = client.models.list().data[0].id

    def grpc_stream(prompt, **sampling):
        def run(started):
            got = Choices()
            for n, part in enumerate(stub.GenerateStream(pb.GenerateRequest(
                    prompt=prompt, max_tokens=MAX_TOKENS, **sampling), timeout=300), start=1):
                got.add(part.index, part.token_ids, part.text, part.logprobs,
                        grpc_top(part.top_logprobs), grpc_prompt_logprobs(part.prompt_logprobs))
                if n == 3:
                    started.set()
            return got
        return run

    def grpc_unary(prompt, **sampling):
        def run(started):
            started.set()
            reply = stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS,
                                                     **sampling), timeout=300)
            got = Choices()
            for c in reply.choices or [reply]:
                got.add(c.index, c.token_ids, c.text, c.logprobs, grpc_top(c.top_logprobs))
            return got
        return run

    def http_unary(prompt, **sampling):
        def run(started):
            started.set()
            reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                              extra_body={"return_token_ids": True}, **sampling)
            got = Choices()
            got.add(0, reply.choices[0].token_ids, reply.choices[0].text)
            return got
        return run

    seeded = dict(temperature=0.9, top_p=0.95)
    return {
        "grpc greedy": grpc_stream("Hello, my name is", temperature=0.0),
        "grpc greedy 2": grpc_stream("def fib(n):", temperature=0.0, stop=["zzz"]),
        "grpc seeded": grpc_stream("Once upon a time", seed=7, **seeded),
        "grpc seeded 2": grpc_stream("The capital of France", seed=-3, top_k=40, temperature=1.0),
        "grpc unary seeded": grpc_unary("A long time ago", seed=11, **seeded),
        "http greedy": http_stream(client, False, "In the beginning", temperature=0),
        "http chat seeded": http_stream(client, True, "Tell me a story", seed=5, **seeded),
        "http unary seeded": http_unary("It was a dark night", seed=13, **seeded),
        # n choices with their alternatives (and, over gRPC, the prompt's logprobs once per
        # choice): each choice resumes where its client stopped
        "grpc n=2 seeded": grpc_stream("There once lived", seed=17, n=2, top_logprobs=2,
                                       prompt_logprobs=2, ignore_eos=True, **seeded),
        "grpc unary n=2 seeded": grpc_unary("On a quiet morning", seed=19, n=2, top_logprobs=2,
                                            ignore_eos=True, **seeded),
        "http chat n=2 seeded": http_stream(client, True, "Tell me a joke", seed=23, n=2,
                                            logprobs=True, top_logprobs=2, **seeded),
    }


def run_all(todo: dict, kill=None) -> dict:
    """Run every job at once; `kill()` once every job has started (streams: 3 chunks in)."""
    started = {name: threading.Event() for name in todo}
    with concurrent.futures.ThreadPoolExecutor(len(todo)) as pool:
        futures = {name: pool.submit(job, started[name]) for name, job in todo.items()}
        if kill is not None:
            for name, event in started.items():
                assert event.wait(120), f"{name} never started"
            kill()
        return {name: f.result(timeout=300) for name, f in futures.items()}


def request_counts(metrics) -> dict[tuple[str, tuple], float]:
    """The request counters of a scrape: {(sample name, labels): value}."""
    return {(name, labels): value for name in REQUEST_COUNTERS
            for labels, value in metrics.get(name, {}).items()}


def test_killing_the_engine_replica_loses_no_request(server, client, engine_actors):
    """SIGKILL the replica (its frontend, KV cache and expert actors go with it) while 11
    requests stream (3 of them n = 2 with top logprobs): each continues on the replica Serve
    starts, and ends as undisturbed, choice by choice. The request metrics add what the
    undisturbed run added (each prompt and first token once, each delivered token of every
    choice once), and expert 0's replicas, set to 2 by hand, are 2 again."""
    todo = jobs(server, client)
    start = request_counts(settled(APP))
    undisturbed = run_all(todo)
    assert all(len(c.token_ids) > 3 for got in undisturbed.values() for c in got.values())
    assert all(len(undisturbed[name]) == 2 and all(len(c.top) == len(c.token_ids) > 3
                                                  for c in undisturbed[name].values())
               for name in todo if "n=2" in name)
    assert all(len(c.prompt) == 1 for c in undisturbed["grpc n=2 seeded"].values())
    after_undisturbed = request_counts(settled(APP))
    engine = serve.get_deployment_handle("EngineServer", app_name=APP)
    assert engine.set_expert_replicas.remote({0: 2}).result(timeout_s=120)[0] == 2
    replica, owned = engine_actors(APP)
    assert len(owned) == 3                                 # experts_per_actor 4: 2 actors + 1
    killed = run_all(todo, kill=lambda: os.kill(replica["Pid"], signal.SIGKILL))
    new_replica, new_owned = engine_actors(APP)
    assert new_replica["Pid"] != replica["Pid"]            # the requests did move
    for name in todo:
        assert_same_choices(killed[name], undisturbed[name], name)
    want = {key: 2 * after_undisturbed[key] - start.get(key, 0) for key in after_undisturbed}
    got, scraped = until_equal(APP, want)
    assert got == want
    delivered = sum(choices.tokens() for choices in killed.values())    # every choice's
    assert total(scraped, "ray_mixtral_ep_generation_tokens_total") - \
        after_undisturbed[("ray_mixtral_ep_generation_tokens_total", ())] == delivered
    assert engine.expert_load.remote().result(timeout_s=60).replicas()[0] == 2
    assert len(new_owned) == 3


# a JSON schema random weights do not close within MAX_TOKENS (an unbounded string): every
# stream is still inside its document when the replica dies
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_killing_the_engine_replica_mid_constrained_streams_resumes_them_exactly(
        server, client, engine_actors):
    """SIGKILL the replica while JSON-schema-constrained chats stream (seeded, greedy, n = 2)
    and a regex-constrained completion: each resumes on the new replica with its grammar
    replayed over the tokens so far, and ends as undisturbed (the same tokens, the same text:
    the document with its one leading space dropped once, not twice)."""
    fmt = {"type": "json_schema",
           "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    seeded = dict(temperature=0.9, seed=31, response_format=fmt)
    todo = {
        "json seeded": http_stream(client, True, "Who are you?", **seeded),
        "json greedy": http_stream(client, True, "Describe a person", temperature=0,
                                   response_format=fmt),
        "json n=2 seeded": http_stream(client, True, "Two people", n=2, **seeded),
        "regex seeded": http_stream(client, False, "Letters:", temperature=1.0, seed=37,
                                    extra_body={"structured_outputs": {"regex": "[a-z ]{8,200}"}}),
    }
    undisturbed = run_all(todo)
    for name, choices in undisturbed.items():
        for c in choices.values():
            assert len(c.token_ids) > 3, name
            assert (re.fullmatch("[a-z ]{8,200}", c.text) if name.startswith("regex")
                    else c.text.startswith('{"name": "')), (name, c.text)
    replica, _ = engine_actors(APP)
    killed = run_all(todo, kill=lambda: os.kill(replica["Pid"], signal.SIGKILL))
    assert engine_actors(APP)[0]["Pid"] != replica["Pid"]
    for name in todo:
        assert_same_choices(killed[name], undisturbed[name], name)


# redeploys APP with a failover bound shorter than a restart: the module's `server` is then
# that app, so this test runs after every test that resumes a stream
def test_past_the_failover_bound_the_client_gets_unavailable(deploy, tiny_checkpoint,
                                                             engine_actors):
    """With a failover bound shorter than a replica's restart, a stream whose engine died ends
    with UNAVAILABLE (retryable) instead of waiting; the restarted engine then serves."""
    stub = deploy(APP, {"model": str(tiny_checkpoint), **ARGS, "failover_timeout_s": 0.5})
    replica, owned = engine_actors(APP)
    assert len(owned) == 2              # a redeploy forgets the replicas set by hand before it
    call = stub.GenerateStream(pb.GenerateRequest(prompt="Once", max_tokens=4000,
                                                  temperature=0.0), timeout=300)
    next(call)
    os.kill(replica["Pid"], signal.SIGKILL)
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        list(call)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert time.monotonic() - began < 30
    deadline = time.monotonic() + 120
    while True:
        try:
            stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=3), timeout=60)
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
            time.sleep(1)


def test_a_bad_failover_bound_is_refused_at_build_time(tiny_checkpoint):
    with pytest.raises(ValueError, match="failover_timeout_s must be a positive number"):
        build_app({"model": str(tiny_checkpoint), "failover_timeout_s": 0})
