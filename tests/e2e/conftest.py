"""One Serve instance with its gRPC proxy on a free port for the session, and the applications on
it, one at a time (each routes "/", so clients need no `application` metadata):

- `tiny_app`: the tiny checkpoint with the tests' defaults, shared by the modules that only call
  it: it stays up from one such module to the next (tests/conftest.py runs them first in the lane);
- `deploy(name, args)`: a module's own application, for tests that kill, reconfigure or delete
  it, or need other args; deleted after the module.

Starting an application deletes the one running before (serve_apps)."""
from __future__ import annotations

import dataclasses
import signal
import time

import grpc
import pytest
from ray import serve

from actors.serving.pool_server import pool_prefix
from cluster.local import EXPERT_SLOT, FRONTEND_SLOT, free_port
from deploy.app import build_app, serve_start_options
from protos import generator_pb2_grpc as pb_grpc

TINY_APP = "mixtral-ep"         # tiny_app's Serve application name
TINY_MODEL = "tiny"             # and the model id its clients send


@pytest.fixture(scope="session")
def serve_ports(ray_cluster) -> tuple[int, int]:
    """(gRPC port, HTTP port) of one Serve instance's proxies, both free ports."""
    grpc_port, http_port = free_port(), free_port()
    serve.start(**serve_start_options(grpc_port, http_port))
    yield grpc_port, http_port
    serve.shutdown()


@pytest.fixture(scope="session")
def grpc_port(serve_ports) -> int:
    return serve_ports[0]


@pytest.fixture(scope="session")
def http_port(serve_ports) -> int:
    return serve_ports[1]


@dataclasses.dataclass(frozen=True)
class Served:
    """An application running on the session's Serve instance."""
    name: str                           # its Serve application name
    model: str                          # the model id HTTP clients send
    stub: pb_grpc.GeneratorStub         # a gRPC client of it through the proxy


class ServeApps:
    """The session's applications, one running at a time, and the gRPC channels to them."""

    def __init__(self, grpc_port: int):
        self.grpc_port = grpc_port
        self.running: str | None = None            # the running application's name
        self.shared: Served | None = None          # tiny_app, while it runs
        self.channels: dict[str, list[grpc.Channel]] = {}

    def run(self, name: str, app) -> pb_grpc.GeneratorStub:
        """Deploy `app` (a Serve Application) as `name`, after deleting a running application
        of another name (the same name is updated in place); a stub once the proxy answers."""
        if self.running not in (None, name):
            self.delete(self.running)
        serve.run(app, name=name, route_prefix="/")
        self.running = name
        return self._stub(name)

    def apply(self, name: str, app_config: dict, timeout_s: float = 300) -> pb_grpc.GeneratorStub:
        """Deploy `app_config` (an `applications:` entry of a Serve config, as in
        deploy/serve.yaml: import_path, args, deployments) as `name` the way `serve deploy`
        does: through Serve's controller, which builds it. Applied again with only
        `deployments` changed (e.g. num_replicas), it updates the running application in
        place: Serve keeps its replicas. A stub once the application runs with exactly the
        `num_replicas` its entries give, all RUNNING; RuntimeError if it failed or timed out."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema
        if self.running not in (None, name):
            self.delete(self.running)
        config = ServeDeploySchema(applications=[{"name": name, "route_prefix": "/",
                                                  **app_config}])
        _get_global_client().deploy_apps(config)
        self.running = name
        want = {d["name"]: {"RUNNING": d["num_replicas"]}
                for d in app_config.get("deployments", ()) if "num_replicas" in d}
        deadline = time.monotonic() + timeout_s
        while True:
            status = serve.status().applications.get(name)
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"deploying {name} failed: {status.message}")
            if status is not None and status.status == "RUNNING" and all(
                    d in status.deployments and status.deployments[d].replica_states == states
                    for d, states in want.items()):
                return self._stub(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not running as configured after {timeout_s} s: "
                                   f"{status}")
            time.sleep(0.5)

    def _stub(self, name: str) -> pb_grpc.GeneratorStub:
        """A stub of a new channel to the proxy (closed with `name`), once the proxy answers."""
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.channels.setdefault(name, []).append(channel)
        grpc.channel_ready_future(channel).result(timeout=60)
        return pb_grpc.GeneratorStub(channel)

    def delete(self, name: str) -> None:
        """Delete application `name` (gone already is fine) and close its channels."""
        for channel in self.channels.pop(name, []):
            channel.close()
        if self.running == name:
            self.running = None
        if self.shared is not None and self.shared.name == name:
            self.shared = None
        serve.delete(name)


@pytest.fixture(scope="session")
def serve_apps(grpc_port):
    apps = ServeApps(grpc_port)
    yield apps
    if apps.running is not None:
        apps.delete(apps.running)


@pytest.fixture(scope="session")
def tiny_args(tiny_checkpoint):
    """tiny_args(**args) -> build_app args: the tiny checkpoint, its frontend on the head and its
    experts on the expert nodes, one thread each, then `args`."""
    def args(**overrides) -> dict:
        return {"model": str(tiny_checkpoint), "expert_resources": EXPERT_SLOT,
                "frontend_resources": FRONTEND_SLOT, "frontend_threads": 1, "expert_threads": 1,
                **overrides}
    return args


@pytest.fixture(scope="module")
def tiny_app(serve_apps, tiny_args, tmp_path_factory) -> Served:
    """TINY_APP: tiny_args() served as model TINY_MODEL (a model's name is its directory's: a
    symlink gives it one), shared by every module that asks while it runs. Its users must leave
    it as they found it: idle, one replica per expert, no key."""
    if serve_apps.shared is None:
        link = tmp_path_factory.mktemp("named") / TINY_MODEL
        link.symlink_to(tiny_args()["model"])
        stub = serve_apps.run(TINY_APP, build_app(tiny_args(model=str(link))))
        serve_apps.shared = Served(TINY_APP, TINY_MODEL, stub)
    return serve_apps.shared


@pytest.fixture(scope="module")
def deploy(serve_apps):
    """deploy(name, app_args) -> a GeneratorStub on the proxy once the app runs; deleted after
    the module."""
    names = []

    def run(name: str, args: dict) -> pb_grpc.GeneratorStub:
        names.append(name)
        return serve_apps.run(name, build_app(args))

    yield run
    for name in dict.fromkeys(names):
        serve_apps.delete(name)


@pytest.fixture
def engine_actors(alive_actors):
    """engine_actors(app) -> (its EngineServer replica, the ExpertWorker actors it uses: those
    that replica owns (`expert_pool: per_replica`) or the app's shared pool's, named after it),
    as GCS actor-table entries (ActorID, Pid, Address, OwnerAddress, Name...)."""
    def find(app: str) -> tuple[dict, list[dict]]:
        [replica] = alive_actors(f"ServeReplica:{app}:EngineServer")
        where = (replica["Address"]["IPAddress"], replica["Address"]["Port"])
        owned = [a for a in alive_actors("ExpertWorker")
                 if (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) == where
                 or (a.get("Name") or "").startswith(pool_prefix(app))]
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
