"""Prometheus metrics end to end: a known workload over gRPC and HTTP, then every node's metrics
endpoint (Ray's exporter, scraped over HTTP) must count exactly what was served (on the shared
app: what it adds to the counts that earlier tests left)."""
from __future__ import annotations

import json
import random
import urllib.request
import uuid

import grpc
import pytest

from model.config import MixtralConfig
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from tests.e2e.prometheus import COUNTERS, scrape, settled, total, until_equal

APP = "mixtral-ep"              # the shared app's (tests/e2e/conftest.py: TINY_APP)
PROMPTS = ["Hello, my name is", "The capital of France is", "def fib(n):"]
MAX_TOKENS = 7


@pytest.fixture(scope="module")
def server(tiny_app):
    assert tiny_app.name == APP
    return tiny_app.stub


def test_counters_equal_what_was_served(server, grpc_port, http_port, tiny_checkpoint):
    before = settled(APP)                              # what earlier tests served
    served = []                                        # (prompt tokens, completion tokens)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for prompt in PROMPTS:
            parts = list(stub.GenerateStream(pb.GenerateRequest(
                prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0), timeout=60))
            served.append((parts[-1].usage.prompt_tokens, parts[-1].usage.completion_tokens))
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models").read())
    body = json.dumps({"model": models["data"][0]["id"], "prompt": "Once upon a time",
                       "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    usage = json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]
    served.append((usage["prompt_tokens"], usage["completion_tokens"]))

    generated = sum(c for _, c in served)
    processed = sum(p + c - 1 for p, c in served)    # every prompt token, every generated one
    cfg = MixtralConfig.from_json(tiny_checkpoint)     # but the last, went through each layer
    want = {("ray_mixtral_ep_generation_tokens_total", ()): generated,
            ("ray_mixtral_ep_prompt_tokens_total", ()): sum(p for p, _ in served),
            ("ray_mixtral_ep_request_success_total", (("finished_reason", "length"),)): len(served),
            ("ray_mixtral_ep_time_to_first_token_seconds_count", ()): len(served),
            ("ray_mixtral_ep_e2e_request_latency_seconds_count", ()): len(served),
            ("ray_mixtral_ep_inter_token_latency_seconds_count", ()): generated - len(served),
            ("ray_mixtral_ep_num_requests_running", ()): 0,
            ("ray_mixtral_ep_kv_cache_usage_perc", ()): 0}
    for layer in range(cfg.num_hidden_layers):        # each token picks top-k experts
        want[("ray_mixtral_ep_expert_routed_tokens_total", (("layer", str(layer)),))] = \
            cfg.num_experts_per_tok * processed
    for name, labels in want:                         # counters: added to what was there
        if name.endswith(COUNTERS):
            want[name, labels] += total(before, name, **dict(labels))
    got, m = until_equal(APP, want)
    assert got == want
    for gauge in ("running", "waiting"):               # exported, not just absent (= 0)
        assert f"ray_mixtral_ep_num_requests_{gauge}" in m
    assert "ray_mixtral_ep_kv_cache_usage_perc" in m
    assert total(m, "ray_mixtral_ep_dispatch_round_trip_seconds_count") > 0
    experts = {dict(k)["expert"] for k in m["ray_mixtral_ep_expert_routed_tokens_total"]}
    assert experts <= {str(e) for e in range(cfg.num_local_experts)} and len(experts) > 1
    # elastic experts: one replica each, and the load over the window is what was just served
    replicas = m["ray_mixtral_ep_expert_replicas"]
    assert {dict(k)["expert"]: v for k, v in replicas.items()} == \
        {str(e): 1 for e in range(cfg.num_local_experts)}
    assert total(m, "ray_mixtral_ep_expert_load_rows_per_second") > 0
    assert total(m, "ray_mixtral_ep_expert_actor_imbalance") >= 1


def test_prefix_cache_counters_count_the_tokens_looked_up_and_reused(server, tiny_checkpoint):
    """Issue 23: queries count each request's prompt tokens, hits its cached_tokens; a cached
    token sends no rows to the experts. The prompts share full blocks (16 tokens) with each
    other only: 48 shared tokens, then a request repeating them and one sharing 1 block."""
    rng = random.Random(uuid.uuid4().int)
    shared = [rng.randrange(1000, 31000) for _ in range(48)]
    before = settled(APP)
    served = []                                        # (prompt, cached, completion tokens)
    for ids in (shared + [7, 8, 9, 10, 11], shared + [12, 13], shared[:16] + [14] * 30):
        usage = server.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=MAX_TOKENS,
                                                   temperature=0.0), timeout=60).usage
        served.append((usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens))
    assert [cached for _, cached, _ in served] == [0, 48, 16]
    cfg = MixtralConfig.from_json(tiny_checkpoint)
    computed = sum(p - cached + c - 1 for p, cached, c in served)
    want = {("ray_mixtral_ep_prefix_cache_queries_total", ()): sum(p for p, _, _ in served),
            ("ray_mixtral_ep_prefix_cache_hits_total", ()): 64}
    for layer in range(cfg.num_hidden_layers):
        want[("ray_mixtral_ep_expert_routed_tokens_total", (("layer", str(layer)),))] = \
            cfg.num_experts_per_tok * computed
    for name, labels in want:
        want[name, labels] += total(before, name, **dict(labels))
    got, _ = until_equal(APP, want)
    assert got == want


def test_the_shared_pool_is_exported_once_by_its_owner_and_each_frontend_apart(server,
                                                                              tiny_checkpoint):
    """Issue 24 (`expert_pool: shared`, the shared app's): the pool's figures (actors per
    expert id, summed load, imbalance, frontends, merged calls) come from the one
    ExpertPoolServer replica, not from each engine replica; an engine replica exports its own
    load per expert id under a name of its own. The expert actors computed exactly the rows
    the frontend routed (each token's k experts in every layer)."""
    before = settled(APP)
    served = []
    for prompt in PROMPTS:
        usage = server.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS,
                                                   temperature=0.0), timeout=60).usage
        served.append((usage.prompt_tokens, usage.completion_tokens))
    cfg = MixtralConfig.from_json(tiny_checkpoint)
    rows = cfg.num_hidden_layers * cfg.num_experts_per_tok * sum(p + c - 1 for p, c in served)
    names = ("ray_mixtral_ep_expert_rows_total", "ray_mixtral_ep_expert_routed_tokens_total")
    want = {(name, ()): rows + total(before, name) for name in names}
    want["ray_mixtral_ep_expert_pool_frontends", ()] = 1
    got, _ = until_equal(APP, want)
    assert got == want
    m = scrape(APP, keep=("deployment", "expert"))
    pool = (("deployment", "ExpertPoolServer"),)

    def series(name: str) -> dict[tuple, float]:
        return dict(m.get(name, {}))
    # one series per expert id, the pool owner's: 8 actors, one per expert id (expert_replicas 1)
    assert series("ray_mixtral_ep_expert_replicas") == {
        tuple(sorted(pool + (("expert", str(e)),))): 1 for e in range(cfg.num_local_experts)}
    for name in ("ray_mixtral_ep_expert_load_rows_per_second",
                 "ray_mixtral_ep_expert_actor_imbalance", "ray_mixtral_ep_expert_calls_total",
                 "ray_mixtral_ep_expert_computes_total", "ray_mixtral_ep_expert_rows_total"):
        assert {dict(k)["deployment"] for k in series(name)} == {"ExpertPoolServer"}, name
    own = series("ray_mixtral_ep_frontend_expert_load_rows_per_second")
    assert {dict(k)["deployment"] for k in own} == {"EngineServer"}
    assert sum(own.values()) > 0 and total(m, "ray_mixtral_ep_expert_load_rows_per_second") > 0
    calls, computes = (total(m, f"ray_mixtral_ep_expert_{n}_total") for n in ("calls", "computes"))
    assert 0 < computes <= calls
    assert total(m, "ray_mixtral_ep_expert_merged_calls_total") <= calls
