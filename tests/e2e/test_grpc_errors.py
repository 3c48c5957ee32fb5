"""RESOURCE_EXHAUSTED and UNAVAILABLE over a real gRPC channel, on an engine of its own with room
for one running and one waiting request (max_num_seqs=1, max_waiting=1). The last tests kill
that engine's replica (which is its frontend) and delete the application, so this module
deploys its own."""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from cluster.local import EXPERT_RESOURCE, EXPERT_SLOT
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from tests.e2e.serve_logs import serve_logs_since

log = logging.getLogger(__name__)

APP = "mixtral-ep-one-slot"
ONE_SLOT = {"max_num_seqs": 1, "max_waiting": 1}
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server(deploy, tiny_checkpoint):
    # per_replica: its engine replica owns its experts (what the death test below checks; the
    # shared pool's are tests/e2e/test_shared_pool.py's)
    return deploy(APP, {
        "model": str(tiny_checkpoint), "expert_resources": EXPERT_SLOT,
        "frontend_resources": {"CPU": 0.01}, "frontend_threads": 1, "expert_threads": 1,
        "engine_args": ONE_SLOT, "expert_pool": "per_replica"})


def short(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_tokens=3, temperature=0.0)


def status(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        assert "Traceback" not in e.details() and "max_waiting" not in e.details(), e.details()
        return e.code()
    return grpc.StatusCode.OK


def test_requests_beyond_max_waiting_are_resource_exhausted(server):
    """Three of four requests behind a running one are refused; each refusal is one INFO line
    in the logs, with no traceback or ERROR line from any replica (the engine replica's
    included) or the proxy."""
    sizes, _ = serve_logs_since()
    hog = server.GenerateStream(pb.GenerateRequest(prompt="Once", max_tokens=4000,
                                                   temperature=0.0), timeout=120)
    next(hog)                                   # it runs, and holds the only sequence slot
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(status, lambda i=i: list(server.GenerateStream(short(f"#{i}"),
                                                                                timeout=60)))
                     for i in range(3)]
            calls.append(pool.submit(status, lambda: server.Generate(short("#3"), timeout=60)))
            deadline = time.monotonic() + 60
            while sum(f.done() for f in calls) < 3:     # one waits behind the hog
                assert time.monotonic() < deadline, "the queue never filled"
                time.sleep(0.05)
            assert [f.result() for f in calls if f.done()] == [RESOURCE_EXHAUSTED] * 3
            hog.cancel()                        # frees the slot: the waiting one runs
            codes = [f.result(timeout=60) for f in calls]
            assert codes.count(grpc.StatusCode.OK) == 1 and codes.count(RESOURCE_EXHAUSTED) == 3
    finally:
        hog.cancel()
    wait_until_idle(server)
    time.sleep(3)                               # Serve writes its log files asynchronously
    _, new = serve_logs_since(sizes)
    assert "Traceback" not in new and " ERROR " not in new, new[-3000:]
    assert new.count("request answered RESOURCE_EXHAUSTED") >= 3, new[-3000:]


def test_http_beyond_max_waiting_is_429_in_openais_shape(server, http_port, tiny_checkpoint):
    """Six HTTP requests (three streaming) behind a running one: one takes the waiting place
    and runs once the slot frees, the other five get 429 in OpenAI's error shape, streaming or
    not. (Which one waits is a race, so all are sent at once and none is singled out.)"""
    def post(stream: bool) -> tuple[bool, int, dict | None]:
        body = json.dumps({"model": tiny_checkpoint.name, "prompt": "hi", "max_tokens": 2,
                           "stream": stream}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions",
                                     data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.read()
                return stream, resp.status, None
        except urllib.error.HTTPError as e:
            return stream, e.code, json.loads(e.read())["error"]

    hog = server.GenerateStream(pb.GenerateRequest(prompt="Once", max_tokens=4000,
                                                   temperature=0.0), timeout=120)
    next(hog)                                   # it runs, and holds the only sequence slot
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            calls = [pool.submit(post, stream) for stream in (False, True) * 3]
            deadline = time.monotonic() + 60
            while sum(f.done() for f in calls) < 5:     # one waits behind the hog
                assert time.monotonic() < deadline, "the waiting place never filled"
                time.sleep(0.05)
            refused = [f.result() for f in calls if f.done()]
            assert {stream for stream, _, _ in refused} == {False, True}
            for _, code, error in refused:
                assert code == 429, error
                assert error["type"] == "rate_limit_error" and "try again" in error["message"]
            hog.cancel()                        # frees the slot: the waiting one runs
            codes = sorted(f.result(timeout=60)[1] for f in calls)
            assert codes == [200] + [429] * 5, codes
    finally:
        hog.cancel()
    wait_until_idle(server)


def wait_until_idle(server, timeout_s: float = 90) -> None:
    """Cancels reach the engine asynchronously: leave it idle for the next test."""
    deadline = time.monotonic() + timeout_s
    while status(lambda: server.Generate(short("idle?"), timeout=60)) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the engine never became idle"
        time.sleep(0.2)


def test_a_slow_readers_cancelled_stream_frees_its_slot(server, grpc_port):
    """A client that stops reading makes Serve's proxy block writing to it (HTTP/2 flow
    control, here a 1 KiB window); when that client cancels, the engine's stream must end too
    (actors/serving/grpc_proxy.py), so the next request runs at once, not after the 4,000 tokens."""
    window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=window) as channel:
            hog = pb_grpc.GeneratorStub(channel).GenerateStream(
                pb.GenerateRequest(prompt="Once", max_tokens=4000, temperature=0.0), timeout=120)
            next(hog)
            time.sleep(8)           # the window fills (~70 messages): the proxy waits to write
            hog.cancel()
        assert status(lambda: server.Generate(short("next"), timeout=30)) == grpc.StatusCode.OK
    finally:
        wait_until_idle(server)


def free_expert_slots() -> float:
    return sum(res.get(EXPERT_RESOURCE, 0.0)
               for res in ray._private.state.available_resources_per_node().values())


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_a_dead_engine_replica_takes_its_experts_along_and_its_stream_moves_on(
        server, engine_actors, alive_actors, grpc_port, http_port):
    """SIGKILL the replica in the middle of a stream: the health checks (gRPC and HTTP) say
    NOT_SERVING / 503 until Serve's new replica has started its engine, then SERVING / 200;
    the stream goes on there (actors/failover.py) and completes; the dead replica's expert
    actors and placement group go with it (Ray's ownership)."""
    replica, owned = engine_actors(APP)
    assert len(owned) == 8
    slots_in_use = len(owned)                   # EXPERT_SLOT: one `expert` per actor
    all_slots = free_expert_slots() + slots_in_use
    call = server.GenerateStream(pb.GenerateRequest(prompt="Once", max_tokens=200,
                                                    temperature=0.0), timeout=300)
    next(call)                                  # streaming from the replica's engine
    os.kill(replica["Pid"], signal.SIGKILL)
    rest = concurrent.futures.ThreadPoolExecutor(1).submit(list, call)

    # while Serve restarts the replica (its engine starting: 8 expert actors, weights), both
    # health checks say not ready, then ready once it answers, and never go back
    grpc_seen, http_seen = [], []               # each check's answers, in order
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def ready() -> bool:
            if grpc_seen[-1:] != ["SERVING"]:
                serving = health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
                grpc_seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(serving))
            if http_seen[-1:] != [200]:
                try:
                    http_seen.append(urllib.request.urlopen(
                        f"http://127.0.0.1:{http_port}/health", timeout=30).status)
                except urllib.error.HTTPError as e:
                    http_seen.append(e.code)
            return grpc_seen[-1] == "SERVING" and http_seen[-1] == 200
        wait_for(ready, "the health checks never said ready again")
    log.info("health while the replica restarted: gRPC %s, HTTP %s", grpc_seen, http_seen)
    assert set(grpc_seen[:-1]) == {"NOT_SERVING"}, grpc_seen   # not ready, then ready
    assert set(http_seen[:-1]) == {503}, http_seen
    last = rest.result(timeout=120)[-1]         # the stream went on on the new replica
    assert last.finish_reason == "length" and last.usage.completion_tokens == 200

    def serves() -> bool:
        return status(lambda: server.Generate(short("hello"), timeout=60)) == grpc.StatusCode.OK
    wait_for(serves, "no new engine replica served")
    new_replica, new_owned = engine_actors(APP)
    assert new_replica["Pid"] != replica["Pid"] and len(new_owned) == 8
    old = {a["ActorID"] for a in owned}
    wait_for(lambda: not old & {a["ActorID"] for a in alive_actors("ExpertWorker")},
             "the dead replica's expert actors outlived it", timeout_s=30)
    wait_for(lambda: free_expert_slots() == all_slots - slots_in_use,
             "the dead replica's placement group still holds expert slots", timeout_s=30)


def test_deleting_the_application_kills_the_experts_and_frees_their_slots(server, alive_actors):
    all_slots = free_expert_slots() + len(alive_actors("ExpertWorker"))
    serve.delete(APP)
    wait_for(lambda: not alive_actors("ExpertWorker"), "expert actors outlived their engine", 30)
    wait_for(lambda: free_expert_slots() == all_slots, "expert slots still reserved", 30)
