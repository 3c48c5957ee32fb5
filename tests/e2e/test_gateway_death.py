"""A gateway replica that dies (SIGKILL) ends only its own streams, with a retryable status
(gRPC UNAVAILABLE, through actors/serving/grpc_proxy.py; an HTTP stream is cut before its
`data: [DONE]`); the other replica's streams complete undisturbed, and a retried request
succeeds.

Both replicas sit on the head, beside the HeadOnly proxy: the proxy routes only to replicas on
its own node while there are any, so one replica there and one elsewhere would leave the other
without streams. The replica killed is the one holding more of them, counted by Serve."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import threading

import grpc
import pytest
import ray

from actors.options import EngineOptions
from actors.serving.gateway import Gateway
from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, HEAD_RESOURCE
from deploy.app import engine_deployment
from model.checkpoint import WeightSource
from protos import generator_pb2 as pb

APP = "mixtral-ep-gateways"
STREAMS = 8
MAX_TOKENS = 400    # streams outlast the wait for all 16 to start, on loaded cores too


@pytest.fixture(scope="module")
def stub(tiny_checkpoint, serve_apps):
    """The application with two gateway replicas (as a Serve config's `num_replicas: 2` for
    Gateway would give); one expert actor is enough for what the gateways do."""
    options = EngineOptions(expert_resources=EXPERT_SLOT, frontend_resources=FRONTEND_SLOT,
                            frontend_threads=1, expert_threads=1, experts_per_actor=8)
    engine = engine_deployment(WeightSource(path=str(tiny_checkpoint)), options)
    on_head = {"num_cpus": 0.1, "resources": {HEAD_RESOURCE: 1}}
    yield serve_apps.run(APP, Gateway.options(num_replicas=2, ray_actor_options=on_head).bind(
        engine, str(tiny_checkpoint), "tiny"))
    serve_apps.delete(APP)


def sse_stream(http_port: int, started) -> tuple[bool, list[int]]:
    """(whether `data: [DONE]` came, token ids) of a streaming /v1/completions call."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True, "return_token_ids": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    ids, done = [], False
    try:
        for line in resp:
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: "):
                if not ids:
                    started.wait(120)
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    except (http.client.HTTPException, OSError):
        pass                                    # the connection was cut mid-stream
    finally:
        conn.close()
    return done, ids


def test_a_dead_gateway_replica_ends_only_its_streams_with_unavailable(stub, alive_actors,
                                                                       http_port):
    gateways = alive_actors(f"ServeReplica:{APP}:Gateway")
    assert len(gateways) == 2
    request = pb.GenerateRequest(prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0.0)
    want = list(stub.Generate(request, timeout=120).token_ids)
    started = threading.Barrier(2 * STREAMS + 1)

    def stream():
        ids, code = [], grpc.StatusCode.OK
        try:
            for part in stub.GenerateStream(request, timeout=300):
                if not ids:
                    started.wait(120)
                ids += part.token_ids
        except grpc.RpcError as e:
            code = e.code()
        return code, ids

    with concurrent.futures.ThreadPoolExecutor(2 * STREAMS) as pool:
        futures = [pool.submit(stream) for _ in range(STREAMS)]
        sse = [pool.submit(sse_stream, http_port, started) for _ in range(STREAMS)]
        started.wait(120)                   # every stream has its first tokens
        ongoing = [ray.get(ray.get_actor(g["Name"], namespace="serve")
                           .get_num_ongoing_requests.remote()) for g in gateways]
        assert min(ongoing) > 0, ongoing        # (a stream may have ended server-side)
        os.kill(gateways[ongoing.index(max(ongoing))]["Pid"], signal.SIGKILL)
        results = [f.result(timeout=300) for f in futures]
        sse_results = [f.result(timeout=300) for f in sse]
    codes = [code for code, _ in results]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert grpc.StatusCode.UNAVAILABLE in codes, codes        # the dead replica had streams
    completed = codes.count(grpc.StatusCode.OK) + sum(done for done, _ in sse_results)
    assert completed >= min(ongoing), (ongoing, codes)        # the other's went on
    for code, ids in results:
        if code == grpc.StatusCode.OK:
            assert ids == want
        else:
            assert ids == want[:len(ids)] and len(ids) < len(want)
    for done, ids in sse_results:                             # HTTP: complete, or cut short
        assert ids == want if done else (ids == want[:len(ids)] and len(ids) < len(want))
    retried = stub.Generate(request, timeout=120)             # a retry succeeds
    assert list(retried.token_ids) == want
