"""protos/client.py against an in-process gRPC server with a fake Generator (no Ray): prompts
from a file or stdin, and a reader that closes the pipe early (`| head -1`) ends it quietly.
tests/e2e/test_grpc.py runs the same client against the real server."""
from __future__ import annotations

import io
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from protos import client
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc


class _Echo(pb_grpc.GeneratorServicer):
    """Streams the prompt's length back; ModelInfo lists many experts (a long output)."""

    def __init__(self):
        self.prompts: list[str] = []

    def GenerateStream(self, request, context):
        self.prompts.append(request.prompt or request.messages[-1].content)
        for _ in range(3):
            yield pb.GenerateResponse(text="ok ", token_ids=[1])
        yield pb.GenerateResponse(finish_reason="length", usage=pb.Usage(completion_tokens=3))

    def ModelInfo(self, request, context):
        experts = [pb.ExpertPlacement(expert_id=e, node_ids=[f"node{e}"]) for e in range(5000)]
        return pb.ModelInfoResponse(model="tiny", num_experts=5000, experts=experts)


@pytest.fixture(scope="module")
def fake_server():
    """(address, servicer) of a fake Generator on a free local port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _Echo()
    pb_grpc.add_GeneratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_a_200_kb_prompt_from_a_file_or_stdin(fake_server, tmp_path, monkeypatch, capsys):
    address, servicer = fake_server
    prompt = "Once upon a time. " * 11_200                 # ~200 KB: too long for an argument
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    assert client.main(["--prompt-file", str(path), "--address", address]) == 0
    assert servicer.prompts[-1] == prompt
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    assert client.main(["-", "--chat", "--address", address]) == 0
    assert servicer.prompts[-1] == prompt
    assert "completion_tokens=3]" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "a prompt is required"),
    (["Hi", "--prompt-file", "p.txt"], "not both"),
    (["--prompt-file", "/no/such/file"], "--prompt-file: cannot read"),
])
def test_a_missing_or_doubled_prompt_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        client.main(argv + ["--address", "127.0.0.1:1"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["info"], ["Hello", "--max-tokens", "3"]])
def test_a_reader_that_closes_the_pipe_early_ends_it_quietly(fake_server, args):
    """As `python -m protos.client info | head -1`: no BrokenPipeError traceback."""
    address, _ = fake_server
    proc = subprocess.Popen([sys.executable, "-m", "protos.client", *args, "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()                                   # the reader goes away
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
