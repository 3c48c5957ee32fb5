"""`serve run deploy/serve.yaml` (`make demo`) and `mixtral-ep-serve model=DIR`
(deploy/__main__.py), as the README says, answer Generate on port 9000 and the
OpenAI-compatible API on port 8000, log how to call them when ready, and stop on Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def serve_until_generate(command: list[str], tmp_path: Path, while_up: Callable[[], None]
                         ) -> tuple[pb.GenerateResponse, str]:
    """Start `command` (a server on ports 9000 / 8000) in its own process group, wait for a
    greedy 5-token Generate to succeed, check /health, call `while_up()`, Ctrl-C it -> (the
    reply, its console log)."""
    env = {**os.environ, "MIXTRAL_EP_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": "local"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        with grpc.insecure_channel("localhost:9000") as channel:
            stub = pb_grpc.GeneratorStub(channel)
            reply = None
            for _ in range(60):      # Serve starts, builds the demo checkpoint, deploys
                try:
                    reply = stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=5,
                                                             temperature=0.0), timeout=10)
                    break
                except grpc.RpcError as e:
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    time.sleep(3)
            assert reply is not None, log_path.read_text()[-3000:]
        with urllib.request.urlopen("http://localhost:8000/health", timeout=30) as resp:
            assert resp.status == 200
        while_up()
        return reply, log_path.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def model_ids() -> list[str]:
    with urllib.request.urlopen("http://localhost:8000/v1/models", timeout=30) as resp:
        return [m["id"] for m in json.loads(resp.read())["data"]]


def test_serve_run_answers_generate(tmp_path, sigint_reaches_children):
    served = {}

    def while_up():
        served["ids"] = model_ids()
    reply, log = serve_until_generate([str(Path(sys.executable).with_name("serve")), "run",
                                       "deploy/serve.yaml"], tmp_path, while_up)
    assert reply.usage.completion_tokens == 5 and reply.finish_reason == "length"
    assert (tmp_path / "cache" / "checkpoints").is_dir()
    assert ('engine replica ready' in log and 'python -m protos.client "Hello" --address '
            'localhost:9000' in log and "curl http://localhost:8000/v1/models" in log), log[-3000:]
    assert ("engine replica ready: model 'mixtral-ep-demo-tiny'" in log and
            "curl http://localhost:8000/v1/chat/completions" in log and
            '"model": "mixtral-ep-demo-tiny"' in log), log[-3000:]
    assert served["ids"] == ["mixtral-ep-demo-tiny"]


def test_one_command_serves_a_checkpoint_over_grpc_and_http(tmp_path, tiny_checkpoint,
                                                            sigint_reaches_children):
    """`python -m deploy model=DIR key=value ...`: the checkpoint under its directory's name,
    string args parsed by type (one expert actor of 8 experts, one torch thread each)."""
    model = tmp_path / "my-mixtral"
    model.symlink_to(tiny_checkpoint)
    served = {}

    def while_up():
        served["ids"] = model_ids()
    reply, log = serve_until_generate(
        [sys.executable, "-m", "deploy", f"model={model}", "experts_per_actor=8",
         "frontend_threads=1", "expert_threads=1", 'engine_args={"max_num_seqs": 8}'],
        tmp_path, while_up)
    assert reply.usage.completion_tokens == 5 and reply.finish_reason == "length"
    assert served["ids"] == ["my-mixtral"]
    assert "engine replica ready: model 'my-mixtral'" in log, log[-3000:]
    assert "the frontend runs here, 1 expert actor" in log, log[-3000:]
