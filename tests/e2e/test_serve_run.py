"""`serve run deploy/serve.yaml` (`make demo`) and `mixtral-ep-serve model=DIR`
(deploy/__main__.py), as the README says, answer Generate on port 9000 and the
OpenAI-compatible API on port 8000, log how to call them when ready, and stop on Ctrl-C."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def launched(command: list[str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Start `command` (a server on ports 9000 / 8000) in its own process group and wait for a
    greedy 5-token Generate to succeed and /health to answer 200 -> (the process, its console
    log's path), the reply under `.reply`; Ctrl-C it at the end if it still runs."""
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
        proc.reply = reply
        yield proc, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve_until_generate(command: list[str], tmp_path: Path, while_up: Callable[[], None]
                         ) -> tuple[pb.GenerateResponse, str]:
    """`launched(command)`, then `while_up()`, then Ctrl-C -> (the reply, its console log)."""
    with launched(command, tmp_path) as (proc, log_path):
        while_up()
        return proc.reply, log_path.read_text()


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


def test_one_command_serves_a_checkpoint_and_drains_on_ctrl_c(tmp_path, tiny_checkpoint,
                                                              sigint_reaches_children):
    """`python -m deploy model=DIR key=value ...`: the checkpoint under its directory's name,
    string args parsed by type (one expert actor of 8 experts, one torch thread each); then
    Ctrl-C during streams drains (check_ctrl_c_drains)."""
    model = tmp_path / "my-mixtral"
    model.symlink_to(tiny_checkpoint)
    command = [sys.executable, "-m", "deploy", f"model={model}", "experts_per_actor=8",
               "frontend_threads=1", "expert_threads=1", 'engine_args={"max_num_seqs": 8}',
               "--graceful-shutdown-timeout-s", str(GRACE_S)]
    with launched(command, tmp_path) as (proc, log_path):
        reply, ids = proc.reply, model_ids()
        log = log_path.read_text()
        assert reply.usage.completion_tokens == 5 and reply.finish_reason == "length"
        assert ids == ["my-mixtral"]
        assert "engine replica ready: model 'my-mixtral'" in log, log[-3000:]
        assert "the frontend runs here, 1 expert actor" in log, log[-3000:]
        check_ctrl_c_drains(proc, log_path, "my-mixtral")


# ---- Ctrl-C drains: new requests refused, short streams finish, long ones end with an error --
GRACE_S = 6.0           # --graceful-shutdown-timeout-s: streams may run 5 s (a 1 s margin)


def http_stream(model: str, max_tokens: int, out: dict) -> None:
    """Stream a greedy completion over HTTP into `out`: "events" (data payloads, in order),
    "times" (time.monotonic() of each), "error" (an exception that ended the body), "ended"."""
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    request = urllib.request.Request("http://localhost:8000/v1/completions", body,
                                     {"Content-Type": "application/json"})
    out["events"], out["times"] = [], []
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            for line in resp:
                if line.startswith(b"data: "):
                    out["events"].append(line[6:].decode().strip())
                    out["times"].append(time.monotonic())
    except Exception as e:  # noqa: BLE001 - a cut stream is what the test looks for
        out["error"] = e
    out["ended"] = time.monotonic()


def grpc_stream(max_tokens: int, out: dict) -> None:
    """Stream a greedy completion over gRPC into `out`: "messages", "times", "code", "details",
    "ended"."""
    out["messages"], out["times"], out["code"] = [], [], grpc.StatusCode.OK
    with grpc.insecure_channel("localhost:9000") as channel:
        request = pb.GenerateRequest(prompt="Hello", max_tokens=max_tokens, temperature=0.0)
        try:
            for message in pb_grpc.GeneratorStub(channel).GenerateStream(request, timeout=60):
                out["messages"].append(message)
                out["times"].append(time.monotonic())
        except grpc.RpcError as e:
            out["code"], out["details"] = e.code(), e.details()
    out["ended"] = time.monotonic()


def tokens_per_s(model: str) -> float:
    """One greedy stream's decode rate over HTTP (tokens/s)."""
    started = time.monotonic()
    out = {}
    http_stream(model, 100, out)
    return 100 / (time.monotonic() - started)


def check_ctrl_c_drains(proc: subprocess.Popen, log_path: Path, model: str) -> None:
    """Ctrl-C while two short and two long streams run (one of each per protocol): a request
    sent after it is refused (503 / UNAVAILABLE), the short ones complete, the long ones go on
    until the grace less its margin and then end with an error event and `data: [DONE]` /
    UNAVAILABLE; the launcher exits without Serve's "failed to shut down" line. Before the
    drain, Ctrl-C cut every stream at once (issue 20)."""
    rate = tokens_per_s(model)
    short, long = max(20, int(rate * 2)), 3500      # ~2 s; far beyond the grace
    outs = {name: {} for name in ("http short", "http long", "grpc short", "grpc long")}
    threads = [threading.Thread(target=http_stream, args=(model, short, outs["http short"])),
               threading.Thread(target=http_stream, args=(model, long, outs["http long"])),
               threading.Thread(target=grpc_stream, args=(short, outs["grpc short"])),
               threading.Thread(target=grpc_stream, args=(long, outs["grpc long"]))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(out.get("times") for out in outs.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    ctrl_c = time.monotonic()
    time.sleep(1.0)
    refused = {}
    http_stream(model, 5, refused)
    assert getattr(refused.get("error"), "code", None) == 503, refused
    with grpc.insecure_channel("localhost:9000") as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.GeneratorStub(channel).Generate(pb.GenerateRequest(prompt="Hi"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shut" in e.value.details()
    for t in threads:
        t.join(timeout=GRACE_S + 30)
    report = {name: {k: v for k, v in out.items() if k not in ("messages", "events", "times")}
              | {"last": (out.get("events") or [None])[-3:]} for name, out in outs.items()}

    assert outs["http short"]["events"][-1] == "[DONE]", report
    assert json.loads(outs["http short"]["events"][-2])["choices"][0]["finish_reason"] == \
        "length", report
    assert outs["grpc short"]["code"] == grpc.StatusCode.OK, report
    assert outs["grpc short"]["messages"][-1].finish_reason == "length", report

    http_long, grpc_long = outs["http long"], outs["grpc long"]
    assert "error" not in http_long and http_long["events"][-1] == "[DONE]", report
    error = json.loads(http_long["events"][-2])["error"]
    assert error["type"] == "service_unavailable" and "shut down" in error["message"], report
    assert grpc_long["code"] == grpc.StatusCode.UNAVAILABLE, report
    assert "shut down" in grpc_long["details"], report
    for out in (http_long, grpc_long):         # they ran on through the grace, then ended
        ended = out["ended"] - ctrl_c
        assert GRACE_S - 1 - 0.5 <= ended <= GRACE_S + 3, (ended, report)
    assert len(grpc_long["messages"]) < long
    proc.wait(timeout=60)
    log = log_path.read_text()
    assert "failed to shut down" not in log, log[-3000:]
