"""256 concurrent streaming clients, half gRPC and half OpenAI HTTP, greedy and seeded, some with
stop strings, one in eight leaving after two chunks: every one gets exactly what it gets alone
(the in-process engine, one request at a time), and afterwards the engine holds no request and
no KV block. Back-pressure end to end is tests/e2e/test_grpc_errors.py; the 10-minute soak is
bench/soak.py."""
from __future__ import annotations

import asyncio
import time

import pytest
from ray import serve

from bench.loadgen import check, expected_outputs, make_jobs, run_jobs
from model.engine import Engine

APP = "mixtral-ep"              # the shared app's (tests/e2e/conftest.py: TINY_APP)
MODEL = "tiny"                  # and its model id (TINY_MODEL)
CLIENTS = 256


@pytest.fixture(scope="module")
def server(tiny_app):
    assert (tiny_app.name, tiny_app.model) == (APP, MODEL)
    return tiny_app.stub


def test_256_concurrent_mixed_clients_get_what_they_get_alone(server, tiny_checkpoint,
                                                               grpc_port, http_port):
    jobs = make_jobs(CLIENTS, seed=1)
    want = expected_outputs(Engine.from_pretrained(tiny_checkpoint), jobs)
    results = asyncio.run(run_jobs(jobs, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}",
                                   MODEL))
    tally = check(jobs, results, want)
    assert tally.ok and tally.completed + tally.cancelled == CLIENTS, tally
    assert tally.cancelled == CLIENTS // 8
    engine = serve.get_deployment_handle("EngineServer", APP)
    deadline = time.monotonic() + 30
    while True:                                        # cancels land asynchronously
        info = engine.info.remote().result(timeout_s=30)
        if info.tracked_requests == 0 and info.free_blocks == info.total_blocks:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
