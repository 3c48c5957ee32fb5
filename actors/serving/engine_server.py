"""The engine deployment: each replica *is* one engine's frontend. Its Engine and Dispatcher run
in the replica's own process (actors/frontend.py, used in-process). Its expert actors are the
application's shared pool's (`expert_pool: shared`, the default: actors/serving/pool_server.py
owns them, the replica follows them, actors/experts/follower.py), or, with `per_replica`, its
own ExpertFleet's (actors/experts/fleet.py), which it starts and owns with their placement
groups. The gateway reaches it through a streaming DeploymentHandle, so a stream crosses no Ray
hop between the replica and its engine. Its options are actors/options.py's EngineOptions.

    Serve proxy -> Gateway -> EngineServer (frontend: scheduler, KV cache, dispatcher)
                                            -> expert actors (one channel each, per layer)

Token ids and SamplingParams in, StreamChunks out; the client going away cancels the stream,
which aborts the request and frees its KV blocks. The replica's own resources (the frontend's:
a GPU on cuda) are its `ray_actor_options` (deploy/app.py sets them from `frontend_resources`;
a Serve config may override them); the placement groups reserve the experts' only.
Shutdown drains first (actors/serving/draining.py): a new stream is refused (UNAVAILABLE / 503),
streams in flight run for the deployment's graceful_shutdown_timeout_s, less a margin, and then
end with Draining; then Serve calls `__del__`, which stops its pool follower, or, with
`per_replica`, kills its own expert actors and releases their groups; a replica that dies
without it takes its own along anyway (Ray's ownership; a shared pool's stay). Its requests
in flight then fail with a RayActorError at the gateway, which re-sends each to a live replica,
or to the one Serve starts, as prompt + tokens so far (actors/failover.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import shlex
from pathlib import Path

import ray
from ray import serve
from ray.serve.schema import LoggingConfig

from actors.experts.fleet import ExpertFleet
from actors.experts.follower import PoolClient
from actors.frontend import Frontend
from actors.info import EngineInfo, ExpertLoad, PoolInfo
from actors.options import EngineOptions
from actors.serving import draining
from actors.serving.caller import watched
from actors.serving.expert_counts import ExpertCounts
from actors.serving.metrics import EngineMetrics
from actors.serving.pool_metrics import PoolGauges
from actors.serving.pool_server import pool_name
from model.checkpoint import WeightSource
from model.engine import Resume, SamplingParams
from model.errors import InvalidRequest, QueueFull

# a child of Serve's logger: its handlers and LoggingConfig apply in a replica
log = logging.getLogger(f"ray.serve.{__name__}")


GENERATOR_SERVICER = "protos.generator_pb2_grpc.add_GeneratorServicer_to_server"


def proxy_addresses() -> tuple[str | None, str]:
    """host:port of Serve's gRPC and HTTP proxies as configured ("localhost" for a wildcard
    host; gRPC None when its proxy does not serve our Generator: `serve run IMPORT_PATH`
    configures no servicer functions), asked of Serve's controller (`get_grpc_config` /
    `get_http_config`: Serve's own, not public API; Ray is pinned); Serve's default ports if
    that fails."""
    try:
        from ray.serve.context import _get_global_client
        controller = _get_global_client()._controller
        http, grpc = ray.get([controller.get_http_config.remote(),
                              controller.get_grpc_config.remote()], timeout=10)
        host = "localhost" if http.host in ("0.0.0.0", "::", "127.0.0.1", "") else http.host
        served = GENERATOR_SERVICER in grpc.grpc_servicer_functions
        return (f"{host}:{grpc.port}" if served else None), f"{host}:{http.port}"
    except Exception as e:  # noqa: BLE001 - only the ready line's text depends on it
        log.debug("could not read the proxies' config: %r", e)
        return "localhost:9000", "localhost:8000"


def ready_banner(model_id: str, actors: int, grpc_address: str | None, http_address: str,
                 api_key: bool = False) -> str:
    """What the engine replica logs once it serves: the model id that requests name, and the
    commands that call it (gRPC only where Serve's gRPC proxy serves our API), framed so that
    it stands out among Serve's lines on the `serve run` console."""
    chat = shlex.quote(json.dumps({"model": model_id, "max_tokens": 32,
                                   "messages": [{"role": "user", "content": "Hello"}]}))
    key = ' -H "Authorization: Bearer $MIXTRAL_EP_API_KEY"' if api_key else ""
    grpc_line = (f'python -m protos.client "Hello" --address {grpc_address}' if grpc_address
                 else "not served here: Serve's grpc_options name no servicer functions "
                      "(serve run deploy/serve.yaml sets them)")
    lines = [f"engine replica ready: model {model_id!r} (the frontend runs here, {actors} "
             f"expert actor{'' if actors == 1 else 's'}). Call it:",
             f"  gRPC:    {grpc_line}",
             f"  OpenAI:  curl http://{http_address}/v1/chat/completions -H "
             f"'Content-Type: application/json'{key} -d {chat}",
             f"  models:  curl http://{http_address}/v1/models{key}"]
    if api_key:
        lines.append("  (this application requires its API key: export MIXTRAL_EP_API_KEY=...)")
    rule = "=" * 78
    return "\n".join(["", rule, *lines, rule.replace("=", "-")])


# no access line per handle call ("CALL stream OK"): a request's one line is the proxy's
# (actors/serving/gateway.py says what is logged)
@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.01},
                  logging_config=LoggingConfig(enable_access_log=False),
                  graceful_shutdown_timeout_s=draining.GRACE_S,
                  graceful_shutdown_wait_loop_s=draining.WAIT_LOOP_S)
class EngineServer:
    def __init__(self, source: WeightSource, options: EngineOptions,
                 model_id: str | None = None, api_key: bool = False, pool=None):
        """`pool` (`expert_pool: shared`): the application's ExpertPoolServer handle; this
        replica connects to its expert actors and follows them (actors/experts/shared.py).
        None (`per_replica`): starts its own expert actors (no frontend bundle: this replica
        is the frontend) while it loads the frontend's weights, and waits for both; on an
        error nothing is left. `model_id`: the name requests give the model (default: the
        checkpoint dir's name); `api_key`: whether the application requires one (only the
        ready line says so)."""
        if (pool is not None) != (options.expert_pool == "shared"):
            raise ValueError(f"expert_pool {options.expert_pool!r} with"
                             f"{'' if pool is not None else 'out'} a pool handle: bind through "
                             f"deploy.app.engine_deployment")
        self.drain = draining.Drain()       # begun by Serve's graceful shutdown
        draining.install()
        app = serve.get_replica_context().app_name
        self.pool = (PoolClient(pool, pool_name(app, source, options)) if pool is not None
                     else None)
        if self.pool is not None:
            self.fleet, self.frontend = None, _frontend(source, options, None, self.pool)
        else:
            self.fleet, self.frontend = _own_fleet(source, options)
            self.counts = ExpertCounts.of_this_replica()    # set by hand: survives this replica
            self.counts.restore(self.fleet)
        frontend = self.frontend
        self.metrics = EngineMetrics(frontend.engine, frontend.dispatcher, frontend.expert_load,
                                     pool=PoolGauges() if self.pool is None else None)
        log.info("%s", ready_banner(model_id or Path(source.path).name,
                                    len(frontend.dispatcher.actors), *proxy_addresses(),
                                    api_key))

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     resume: tuple[Resume, ...] | None = None, caller: str | None = None):
        """StreamChunks of one request; `resume`: where a dead replica's stream of it stopped
        (actors/failover.py); `caller`: the calling gateway replica's actor id, whose death
        cancels the request (actors/serving/caller.py; Ray would let it run on). A client's
        error (InvalidRequest, QueueFull) is yielded as the last item instead of raised:
        raised, Serve's replica would log it at ERROR with a traceback ("Request failed.");
        ResumableStream raises it in the caller. So is Draining:
        a stream started while this replica drains, or still running at the grace's end."""
        chunks = None
        try:
            self.drain.check()
            chunks = draining.DrainedStream(
                watched(self.frontend.stream(prompt_ids, params, resume), caller), self.drain)
            async for chunk in chunks:
                yield chunk
        except (InvalidRequest, QueueFull, draining.Draining) as e:
            yield e
        finally:                 # ended early (the client left): the request is aborted now
            if chunks is not None:
                await chunks.aclose()

    async def info(self) -> EngineInfo:
        return await self.frontend.info()

    async def expert_load(self) -> ExpertLoad:
        return self.frontend.expert_load()

    async def set_expert_replicas(self, replicas: dict[int, int]) -> dict[int, int]:
        """Live scaling of the expert actors this replica uses (actors/experts/scaling.py):
        the shared pool's, for every replica; else this replica's own. -> replicas per
        expert id. ValueError / PlacementError change nothing. The result is the application's
        until it is redeployed: the shared pool outlives replicas; a replica that starts in
        this one's place restores its own pool's (actors/serving/expert_counts.py)."""
        if self.pool is not None:
            return await self.pool.acall("set_expert_replicas", replicas)
        return await asyncio.to_thread(self.counts.set, self.fleet, replicas)

    async def pool_info(self) -> PoolInfo | None:
        """The shared pool (its actors, nodes, summed load), None with `per_replica`."""
        return await self.pool.acall("info") if self.pool is not None else None

    async def ping(self) -> None:
        """Answers as soon as this replica's event loop does: the health checks' call."""

    def check_health(self) -> None:
        """Serve's periodic liveness check: RuntimeError once the metrics thread died (Serve
        then replaces this replica; its requests fail over)."""
        self.metrics.check()

    def __del__(self):
        if hasattr(self, "metrics"):
            self.metrics.close()
        if getattr(self, "frontend", None) is not None and self.frontend.follower is not None:
            self.frontend.follower.stop()
        if getattr(self, "fleet", None) is not None:   # not if start-up failed (stopped then)
            self.fleet.shutdown()


def _frontend(source: WeightSource, o: EngineOptions, experts, pool=None) -> Frontend:
    return Frontend(source, experts, o.dtype, o.device, o.frontend_threads, o.engine_args,
                    o.frontend_dispatch_args(), o.transport, pool)


def _own_fleet(source: WeightSource, o: EngineOptions) -> tuple[ExpertFleet, Frontend]:
    """`per_replica`: this replica's expert actors, started while its frontend loads."""
    fleet = ExpertFleet.start(source, o)
    try:
        frontend = _frontend(source, o, fleet.experts)
    except BaseException:
        fleet.shutdown()
        raise
    fleet.attach(frontend.set_experts_now, frontend.expert_load)
    return fleet, frontend
