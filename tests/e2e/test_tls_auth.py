"""Access control end to end: an application with an API key (Serve args `api_key_file`), called
directly and through the TLS-terminating front shipped in deploy/nginx/ (a real nginx, a
self-signed certificate from deploy/nginx/make-cert.sh, real TLS clients: grpc's secure channel,
the `openai` package over HTTPS, the CLI with --tls). Missing or wrong keys get UNAUTHENTICATED
/ HTTP 401; health checks stay open; the key never reaches a log."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, free_port
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
APP = "mixtral-ep-auth"
KEY = "k3y-" + "7f3a9c" * 6                    # what no log may contain
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def server(deploy, tiny_checkpoint, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(KEY + "\n")
    return deploy(APP, {"model": str(tiny_checkpoint), "api_key_file": str(key_file),
                        "expert_resources": EXPERT_SLOT, "frontend_resources": FRONTEND_SLOT,
                        "frontend_threads": 1, "expert_threads": 1,
                        "experts_per_actor": 8})    # one expert actor: the key is the gateway's


@pytest.fixture(scope="module")
def tls_front(server, grpc_port, http_port, tmp_path_factory):
    """nginx with deploy/nginx/nginx.conf, its ports and paths pointed at this test's: yields
    (its port, the certificate clients trust)."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light); .ci/run installs it")
    work = tmp_path_factory.mktemp("nginx")
    subprocess.run(["sh", str(ROOT / "deploy/nginx/make-cert.sh"), str(work)], check=True,
                   capture_output=True)
    port = free_port()
    conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
    for old, new in [("listen 443 ", f"listen {port} "),
                     ("127.0.0.1:9000", f"127.0.0.1:{grpc_port}"),
                     ("127.0.0.1:8000", f"127.0.0.1:{http_port}"),
                     ("/etc/mixtral-ep/tls", str(work)),
                     ("/tmp/mixtral-ep-nginx", str(work / "nginx"))]:
        assert old in conf, old
        conf = conf.replace(old, new)
    (work / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([nginx, "-c", str(work / "nginx.conf"), "-p", str(work)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            urllib.request.urlopen(f"https://localhost:{port}/health", timeout=5,
                                   context=_tls(work / "server.crt"))
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "nginx never answered"
            time.sleep(0.5)
    yield port, work / "server.crt"
    proc.terminate()
    proc.wait(timeout=30)


def _tls(cert: Path):
    import ssl
    return ssl.create_default_context(cafile=str(cert))


def _status(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert KEY not in (e.details() or "")
        return e.code()


def _generate_checks(stub: pb_grpc.GeneratorStub) -> None:
    req = pb.GenerateRequest(prompt="Hello", max_tokens=3, temperature=0.0)
    bearer = [("authorization", f"Bearer {KEY}")]
    assert _status(lambda: stub.Generate(req, timeout=60)) == UNAUTHENTICATED
    assert _status(lambda: stub.Generate(req, timeout=60, metadata=[
        ("authorization", f"Bearer {KEY}x")])) == UNAUTHENTICATED
    assert _status(lambda: list(stub.GenerateStream(req, timeout=60))) == UNAUTHENTICATED
    assert _status(lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=60)) == UNAUTHENTICATED
    assert len(stub.Generate(req, timeout=60, metadata=bearer).token_ids) == 3
    assert len([p for p in stub.GenerateStream(req, timeout=60, metadata=bearer)]) >= 1
    assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=60, metadata=bearer).num_experts == 8


def test_grpc_needs_the_key_and_health_does_not(server, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        _generate_checks(pb_grpc.GeneratorStub(channel))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_http_needs_the_key_before_reading_the_body(server, http_port):
    base = f"http://127.0.0.1:{http_port}"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        req = urllib.request.Request(f"{base}/v1/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        body = json.loads(e.value.read())
        assert e.value.code == 401 and body["error"]["type"] == "authentication_error"
    with urllib.request.urlopen(f"{base}/health", timeout=30) as resp:      # open for probes
        assert resp.status == 200
    for docs in ("/docs", "/redoc", "/openapi.json"):           # every field and limit
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + docs, timeout=30)
        assert e.value.code == 401, docs
        req = urllib.request.Request(base + docs, headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200, docs
    good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    model = good.models.list().data[0].id
    reply = good.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert reply.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_through_the_tls_front(tls_front, capsys, monkeypatch):
    port, cert = tls_front
    creds = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        _generate_checks(pb_grpc.GeneratorStub(channel))
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    client = openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key=KEY, max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=_tls(cert)))
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model,
                                            messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, stream=True)
    assert sum(1 for _ in stream) >= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key="wrong", max_retries=0,
                      http_client=openai.DefaultHttpxClient(verify=_tls(cert))).models.list()
    from protos.client import main
    monkeypatch.setenv("MIXTRAL_EP_API_KEY", KEY)
    assert main(["Hello", "--address", f"localhost:{port}", "--tls", "--ca-cert", str(cert),
                 "--max-tokens", "3"]) == 0
    assert "finish_reason=length" in capsys.readouterr().out


def test_the_key_is_never_logged(server, grpc_port):
    """After the calls above (refused and accepted), no file of the cluster's session
    (Serve's and Ray's logs) holds the key."""
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    holding = [p for p in session.rglob("*") if p.is_file() and p.stat().st_size < 50 * 2**20
               and KEY.encode() in p.read_bytes()]
    assert not holding
