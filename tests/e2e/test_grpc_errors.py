"""RESOURCE_EXHAUSTED and UNAVAILABLE over a real gRPC channel, on an engine of its own with room
for one running and one waiting request (max_num_seqs=1, max_waiting=1). The last test kills
that engine's frontend, so this module deploys its own application."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import grpc
import pytest
import ray

from cluster.local import EXPERT_SLOT
from protos import generator_pb2 as pb

ONE_SLOT = {"max_num_seqs": 1, "max_waiting": 1}
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server(deploy, tiny_checkpoint):
    return deploy("mixtral-ep-one-slot", {
        "model": str(tiny_checkpoint), "expert_resources": EXPERT_SLOT,
        "frontend_resources": {"CPU": 0.01}, "threads": 1, "engine_args": ONE_SLOT})


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


def test_a_dead_frontend_is_unavailable(server):
    # the GCS's actor table, as cluster/placement.py reads resources: the state API needs the
    # dashboard, which can take longer than a test to answer on a loaded machine
    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    [pid] = [a["Pid"] for a in alive if a["ActorClassName"] == "Frontend"]
    os.kill(pid, signal.SIGKILL)
    assert status(lambda: server.Generate(short("hello"), timeout=60)) == grpc.StatusCode.UNAVAILABLE
    assert status(lambda: list(server.GenerateStream(short("hello"), timeout=60))) == \
        grpc.StatusCode.UNAVAILABLE
