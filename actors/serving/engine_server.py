"""The engine deployment: each replica *is* one engine's frontend. Its Engine and Dispatcher run
in the replica's own process (actors/frontend.py, used in-process), and it starts and owns its
expert actors and their placement groups (actors/experts/pool.py); the gateway reaches it through a
streaming DeploymentHandle, so a stream crosses no Ray hop between the replica and its engine.

    Serve proxy -> Gateway -> EngineServer (frontend: scheduler, KV cache, dispatcher)
                                            -> expert actors (one channel each, per layer)

Token ids and SamplingParams in, StreamChunks out; the client going away cancels the stream,
which aborts the request and frees its KV blocks. The replica's own resources (the frontend's:
a GPU on cuda) are its `ray_actor_options` (deploy/app.py sets them from `frontend_resources`;
a Serve config may override them); the placement groups reserve the experts' only.
Shutdown (Serve calls `__del__`) kills the expert actors and releases their groups; a replica
that dies without it takes them along anyway (Ray's ownership). Its requests in flight then
fail with a RayActorError at the gateway, which re-sends each to a live replica, or to the one
Serve starts, as prompt + tokens so far (actors/failover.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging

import ray
from ray import serve

from actors.frontend import Frontend
from actors.info import EngineInfo, ExpertLoad
from actors.serving.metrics import EngineMetrics
from actors.experts.pool import ExpertPool, check_start_args, default_resources, frontend_runtime_env
from actors.experts.scaling import Autoscaler, ExpertAutoscaling, ExpertScaler
from cluster.placement import resource_options
from model.checkpoint import WeightSource
from model.engine import Resume, SamplingParams
from model.errors import InvalidRequest, QueueFull

# a child of Serve's logger: its handlers and LoggingConfig apply in a replica
log = logging.getLogger(f"ray.serve.{__name__}")


def proxy_addresses() -> tuple[str, str]:
    """host:port of Serve's gRPC and HTTP proxies as configured ("localhost" for a wildcard
    host), asked of Serve's controller (`get_grpc_config` / `get_http_config`: Serve's own, not
    public API; Ray is pinned); Serve's default ports if that fails."""
    try:
        from ray.serve.context import _get_global_client
        controller = _get_global_client()._controller
        http, grpc = ray.get([controller.get_http_config.remote(),
                              controller.get_grpc_config.remote()], timeout=10)
        host = "localhost" if http.host in ("0.0.0.0", "::", "127.0.0.1", "") else http.host
        return f"{host}:{grpc.port}", f"{host}:{http.port}"
    except Exception as e:  # noqa: BLE001 - only the ready line's text depends on it
        log.debug("could not read the proxies' config: %r", e)
        return "localhost:9000", "localhost:8000"


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """One engine replica's options, built once from the Serve application's args (the field
    names are the args' names; deploy/app.py)."""
    dtype: str = "auto"                         # "auto": the checkpoint's torch_dtype
    device: str = "cpu"
    expert_replicas: int = 1
    experts_per_actor: int = 1
    expert_resources: dict | None = None        # per expert actor
    frontend_resources: dict | None = None      # the replica's own: ray_actor_options()
    frontend_threads: int | None = None         # torch threads of the replica (None: all cores)
    expert_threads: int | None = None           # per expert actor (None: Ray's, 1 if fractional)
    placement_timeout_s: float = 60.0
    transport: str = "channel"
    engine_args: dict | None = None
    expert_autoscaling: dict | None = None      # actors/experts/scaling.py: ExpertAutoscaling; None: off

    def __post_init__(self):
        check_start_args(None, self.dtype, self.transport, frontend_threads=self.frontend_threads,
                         expert_threads=self.expert_threads)
        ExpertAutoscaling.from_args(self.expert_autoscaling)

    def ray_actor_options(self) -> dict:
        """The replica's resources, i.e. the frontend's: `frontend_resources`, by default
        a GPU and a CPU on cuda, a small CPU share on cpu; and the frontend's runtime_env
        (actors/experts/pool.py: frontend_runtime_env)."""
        return {**resource_options(self.frontend_resources or default_resources(self.device)),
                **frontend_runtime_env(self.device)}


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.01})
class EngineServer:
    def __init__(self, source: WeightSource, options: EngineOptions):
        """Starts the expert actors (no frontend bundle: this replica is the frontend), loads
        the frontend's weights meanwhile, and waits for both; on an error nothing is left."""
        o = options
        policy = ExpertAutoscaling.from_args(o.expert_autoscaling)
        pool = ExpertPool.start(source, o.dtype, o.device, expert_replicas=o.expert_replicas,
                                experts_per_actor=o.experts_per_actor,
                                expert_resources=o.expert_resources,
                                expert_threads=o.expert_threads,
                                placement_timeout_s=o.placement_timeout_s)
        try:
            frontend = Frontend(source, pool.experts, o.dtype, o.device, o.frontend_threads,
                                o.engine_args, transport=o.transport,
                                dispatch_args={"load_window_s": policy.window_s} if policy else None)
            pool.ready()
        except BaseException:
            pool.shutdown()
            raise
        self.pool, self.frontend = pool, frontend
        self.scaler = ExpertScaler(pool, frontend.set_experts_now,
                                   frontend.engine.cfg.num_local_experts)
        self.autoscaler = Autoscaler(policy, self.scaler, frontend.expert_load) if policy else None
        if self.autoscaler is not None:
            self.autoscaler.start()
        self.metrics = EngineMetrics(frontend.engine, frontend.dispatcher, frontend.expert_load)
        grpc_address, http_address = proxy_addresses()
        log.info("engine replica ready: the frontend runs here, %d expert actors. Call it over "
                 "gRPC at %s:  python -m protos.client \"Hello\" --address %s   or the "
                 "OpenAI-compatible API at http://%s/v1:  curl http://%s/v1/models",
                 len(pool.experts.actors), grpc_address, grpc_address, http_address,
                 http_address)

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     resume: Resume | None = None):
        """StreamChunks of one request; `resume`: where a dead replica's stream of it stopped
        (actors/failover.py). A client's error (InvalidRequest, QueueFull) is yielded as the
        last item instead of raised: raised, Serve's replica would log it at ERROR with a
        traceback ("Request failed."); ResumableStream raises it in the caller."""
        request = self.metrics.request(len(prompt_ids))
        try:
            async for chunk in self.frontend.stream(prompt_ids, params, resume):
                request.chunk(chunk.token_ids, chunk.finish_reason)
                yield chunk
        except (InvalidRequest, QueueFull) as e:
            yield e

    async def info(self) -> EngineInfo:
        return await self.frontend.info()

    async def expert_load(self) -> ExpertLoad:
        return self.frontend.expert_load()

    async def set_expert_replicas(self, replicas: dict[int, int]) -> dict[int, int]:
        """Live scaling of this engine's expert actors (actors/experts/scaling.py); -> replicas per
        expert id. ValueError / PlacementError change nothing."""
        return await asyncio.to_thread(self.scaler.set_expert_replicas, replicas)

    async def ping(self) -> None:
        """Answers as soon as this replica's event loop does: the health checks' call."""

    def __del__(self):
        if getattr(self, "autoscaler", None) is not None:
            self.autoscaler.stop()
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "scaler"):        # not if start-up failed (it cleaned up then)
            with self.scaler.lock:         # a scaling change in progress finishes first
                self.pool.shutdown()
