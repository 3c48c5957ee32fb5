"""One Serve instance with its gRPC proxy on a free port, shared by the e2e modules; each module
deploys its own application and deletes it when done (one application at a time, so clients
need no `application` metadata)."""
from __future__ import annotations

import signal

import grpc
import pytest
from ray import serve
from ray.serve.config import gRPCOptions

from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, free_port
from deploy.app import GRPC_SERVICER_FUNCTIONS, build_app
from protos import generator_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def serve_ports(ray_cluster) -> tuple[int, int]:
    """(gRPC port, HTTP port) of one Serve instance's proxies, both free ports."""
    grpc_port, http_port = free_port(), free_port()
    serve.start(proxy_location="HeadOnly", http_options={"port": http_port},
                grpc_options=gRPCOptions(port=grpc_port,
                                         grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    yield grpc_port, http_port
    serve.shutdown()


@pytest.fixture(scope="session")
def grpc_port(serve_ports) -> int:
    return serve_ports[0]


@pytest.fixture(scope="session")
def http_port(serve_ports) -> int:
    return serve_ports[1]


@pytest.fixture(scope="module")
def deploy(grpc_port):
    """deploy(name, app_args) -> a GeneratorStub on the proxy once the app runs; deleted after
    the module."""
    names, channels = [], []

    def run(name: str, args: dict) -> pb_grpc.GeneratorStub:
        serve.run(build_app(args), name=name, route_prefix="/")
        names.append(name)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        channels.append(channel)
        grpc.channel_ready_future(channel).result(timeout=60)
        return pb_grpc.GeneratorStub(channel)

    yield run
    for channel in channels:
        channel.close()
    for name in names:
        serve.delete(name)


@pytest.fixture(scope="module")
def deploy_tiny(deploy, tiny_checkpoint, tmp_path_factory):
    """deploy_tiny(app, model_name, **args) -> a GeneratorStub: the tiny checkpoint served under
    `model_name` (a model's name is its directory's: a symlink gives it one), its frontend on
    the head and its experts on the expert nodes, one thread each."""
    def run(app: str, model_name: str, **args) -> pb_grpc.GeneratorStub:
        link = tmp_path_factory.mktemp("named") / model_name
        link.symlink_to(tiny_checkpoint)
        return deploy(app, {"model": str(link), "expert_resources": EXPERT_SLOT,
                            "frontend_resources": FRONTEND_SLOT, "frontend_threads": 1,
                            "expert_threads": 1, **args})
    return run


@pytest.fixture
def engine_actors(alive_actors):
    """engine_actors(app) -> (its EngineServer replica, the ExpertWorker actors that replica
    owns), as GCS actor-table entries (ActorID, Pid, Address, OwnerAddress...)."""
    def find(app: str) -> tuple[dict, list[dict]]:
        [replica] = alive_actors(f"ServeReplica:{app}:EngineServer")
        where = (replica["Address"]["IPAddress"], replica["Address"]["Port"])
        owned = [a for a in alive_actors("ExpertWorker")
                 if (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) == where]
        return replica, owned
    return find


@pytest.fixture
def sigint_reaches_children():
    """SIGINT acts as a terminal's Ctrl-C in the processes this test starts, even where pytest
    runs with SIGINT ignored (a background job of a non-interactive shell, e.g. CI under
    nohup): an ignored signal stays ignored across exec, a handler does not."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
