"""`serve run deploy/serve.yaml`, as the README says, answers Generate on port 9000 and the
OpenAI-compatible API on port 8000, and logs how to call it when it is ready."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_serve_run_answers_generate(tmp_path, sigint_reaches_children):
    env = {**os.environ, "MIXTRAL_EP_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": "local"}
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_bin), "run", "deploy/serve.yaml"], cwd=ROOT, env=env,
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
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
                    assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    import time
                    time.sleep(3)
            assert reply is not None, (tmp_path / "serve.log").read_text()[-3000:]
            assert reply.usage.completion_tokens == 5 and reply.finish_reason == "length"
            assert (tmp_path / "cache" / "checkpoints").is_dir()
        log = (tmp_path / "serve.log").read_text()
        assert ('engine replica ready' in log and 'python -m protos.client "Hello" --address '
                'localhost:9000' in log and "curl http://localhost:8000/v1/models" in log), log[-3000:]
        assert ("engine replica ready: model 'mixtral-ep-demo-tiny'" in log and
                "curl http://localhost:8000/v1/chat/completions" in log and
                '"model": "mixtral-ep-demo-tiny"' in log), log[-3000:]
        with urllib.request.urlopen("http://localhost:8000/v1/models", timeout=30) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "mixtral-ep-demo-tiny"
        with urllib.request.urlopen("http://localhost:8000/health", timeout=30) as resp:
            assert resp.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
