"""The whole server as an operator starts it, `python -m deploy` (deploy/__main__.py) in a
process group of its own, on free ports, for a benchmark that stops it as an operator does:

    with Launched(checkpoint, "tiny", grace_s=10, workdir=tmp) as server:
        ...load on server.grpc_address and server.http_url...
        exit_s = server.interrupt(timeout_s=60)      # Ctrl-C; seconds until it exited, or None

The server runs on a Ray cluster of its own (`RAY_ADDRESS=local`): start it only when no other
Ray of this process runs. Its Serve config is deploy/serve.yaml with the ports changed; its
console goes to `workdir/serve.log` (`.log()` reads it).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import yaml

from cluster.local import free_port
from deploy.__main__ import DEFAULT_CONFIG
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

log = logging.getLogger("bench.launcher")
ROOT = Path(__file__).resolve().parents[1]
# the engine's options in a benchmark on 2 cores: 8 expert actors, one torch thread each
ENGINE_ARGS = ("frontend_threads=1", "expert_threads=1")


class Launched:
    """`python -m deploy model=<a link named `model` to checkpoint>` with graceful shutdown
    `grace_s` (seconds) on every deployment; entering waits up to `ready_s` for a greedy
    1-token Generate and /health 200 (RuntimeError with the log's tail if the server exits or
    is not ready by then); leaving SIGKILLs the group if it still runs."""

    def __init__(self, checkpoint: Path, model: str, grace_s: float, workdir: Path,
                 ready_s: float = 300.0):
        self.grpc_port, self.http_port = free_port(), free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self._workdir, self._ready_s = workdir, ready_s
        link = workdir / model
        if not link.exists():
            link.symlink_to(Path(checkpoint).resolve())
        self._command = [sys.executable, "-m", "deploy", f"model={link}", *ENGINE_ARGS,
                         "--config", str(self._write_config()),
                         "--graceful-shutdown-timeout-s", f"{grace_s:g}"]
        self.proc: subprocess.Popen | None = None

    def _write_config(self) -> Path:
        """deploy/serve.yaml with this server's ports, in the workdir."""
        config = yaml.safe_load(DEFAULT_CONFIG.read_text())
        config["http_options"]["port"] = self.http_port
        config["grpc_options"]["port"] = self.grpc_port
        path = self._workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def log(self) -> str:
        return (self._workdir / "serve.log").read_text(errors="replace")

    def __enter__(self) -> Launched:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # an ignored SIGINT stays ignored across exec (a background job): Ctrl-C must reach it
            signal.signal(signal.SIGINT, signal.default_int_handler)
        env = {**os.environ, "RAY_ADDRESS": "local"}
        with open(self._workdir / "serve.log", "w") as out:
            self.proc = subprocess.Popen(self._command, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        started = time.monotonic()
        while time.monotonic() - started < self._ready_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            if self._answers():
                log.info("server ready in %.0f s (gRPC %s, HTTP %s)",
                         time.monotonic() - started, self.grpc_address, self.http_url)
                return
            time.sleep(2)
        raise RuntimeError(f"the server was not ready within {self._ready_s:.0f} s:\n"
                           f"{self.log()[-3000:]}")

    def _answers(self) -> bool:
        try:
            with grpc.insecure_channel(self.grpc_address) as channel:
                pb_grpc.GeneratorStub(channel).Generate(
                    pb.GenerateRequest(prompt="Hello", max_tokens=1, temperature=0.0),
                    timeout=10)
            with urllib.request.urlopen(f"{self.http_url}/health", timeout=10) as resp:
                return resp.status == 200
        except (grpc.RpcError, OSError):
            return False

    def interrupt(self, timeout_s: float) -> float | None:
        """Ctrl-C the server's process group -> seconds until the launcher exited, or None if
        it still ran after `timeout_s` (then it is SIGKILLed)."""
        sent = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
            return time.monotonic() - sent
        except subprocess.TimeoutExpired:
            log.warning("the server still ran %.0f s after Ctrl-C: killed", timeout_s)
            self.__exit__()
            return None

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
