"""The Serve application: gateway (gRPC, CPU, stateless) -> engine deployment (each replica is
one engine's frontend and owns its expert actors: actors/serving/engine_server.py). `serve run
deploy/serve.yaml` calls `build_app(args)`:

    model:            checkpoint directory; omitted: a `tiny` random checkpoint with the real
                      tokenizer, created once under $MIXTRAL_EP_CACHE (its text is gibberish)
    dtype:            auto | float32 | bfloat16 | float16 (default auto: the checkpoint's torch_dtype)
    device:           cpu | cuda (default cpu)
    expert_replicas:  actors per expert id (default 1)
    transport:        channel (default: a ZeroMQ channel per expert actor) | object_refs
    experts_per_actor: expert ids per expert actor (default 1; must divide num_local_experts);
                      an actor is one placement unit asking for expert_resources
    expert_resources: Ray resources per expert actor (default: 1 GPU + 1 CPU on cuda, a
                      small CPU share on cpu), reserved in the engine's placement group
    frontend_resources: the engine replica's own resources, i.e. the frontend's (same
                      defaults); they become EngineServer's `ray_actor_options`, which a
                      `deployments:` entry of a Serve config replaces if it sets them
    frontend_threads: torch threads of the engine replica (default: every core on cpu; it gets a
                      short OpenMP spin there, actors/experts/pool.py: FRONTEND_CPU_ENV)
    expert_threads:   torch threads per expert actor (default: Ray's for its CPUs, 1 for a share)
    engine_args:      Engine options (max_num_seqs, max_num_batched_tokens, max_waiting, ...)
    expert_autoscaling: replicas of each expert id follow its measured routing load (default
                      off): {min_replicas, max_replicas, target_rows_per_s or
                      target_load_ratio, window_s, cooldown_s, interval_s, downscale_headroom}
                      (actors/experts/scaling.py: ExpertAutoscaling); each added replica asks for
                      expert_resources on a node with room
    api_key_env / api_key_file: the name of an environment variable, or a file, holding the API
                      key every gRPC and /v1 call must carry (`authorization: Bearer <key>`);
                      read here, only its digest reaches the gateways (actors/serving/auth.py)
    failover_timeout_s: how long a request whose engine replica died waits for another (or the
                      restarted one) to take it back, per failover (default 120; then
                      UNAVAILABLE). With one engine replica a request waits for Serve to
                      restart it (weights and all): set this above that restart
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ray.serve import Application

from actors.serving.auth import key_digest
from actors.serving.gateway import Gateway
from actors.serving.engine_server import EngineOptions, EngineServer
from model.checkpoint import WeightSource, check_checkpoint_dir
from model.random_checkpoint import cached_random_checkpoint

# a child of Serve's logger: its handlers (replica log files, the console of `serve run`) and
# its LoggingConfig apply; a plain module logger has no handler in a Serve process
log = logging.getLogger(f"ray.serve.{__name__}")

_ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(EngineOptions))
_GATEWAY_KEYS = ("failover_timeout_s", "api_key_env", "api_key_file")
# what Serve's gRPC proxy serves (`grpc_options.grpc_servicer_functions`; the Serve configs in
# deploy/ list the same, a test checks): our API, the standard health service, and the hook
# that answers a call whose gateway replica died with UNAVAILABLE (actors/serving/grpc_proxy.py)
GRPC_SERVICER_FUNCTIONS = ["protos.generator_pb2_grpc.add_GeneratorServicer_to_server",
                           "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
                           "actors.serving.grpc_proxy.add_retryable_status_to_server"]


def build_app(args: dict) -> Application:
    unknown = set(args) - {"model", *_GATEWAY_KEYS, *_ENGINE_KEYS}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; expected model, "
                         f"{', '.join(_GATEWAY_KEYS + _ENGINE_KEYS)}")
    failover_timeout_s = args.get("failover_timeout_s", 120.0)
    if isinstance(failover_timeout_s, bool) or not isinstance(failover_timeout_s, (int, float)) \
            or not 0 < failover_timeout_s < float("inf"):
        raise ValueError(f"failover_timeout_s must be a positive number of seconds, got "
                         f"{failover_timeout_s!r}")
    api_key_digest = key_digest(args)          # now: a missing key fails the deploy at once
    path = args.get("model") or str(cached_random_checkpoint("tiny"))
    name = Path(path).name if args.get("model") else "mixtral-ep-demo-tiny"
    options = EngineOptions(**{k: args[k] for k in _ENGINE_KEYS if k in args})
    if args.get("model"):
        check_checkpoint_dir(path)             # now, not after replicas crash-loop on it
    WeightSource(path=path).resolve_dtype(options.dtype)      # "auto": reads its config.json
    log.info("serving %s with %s; the engine replica logs how to call it once it is ready",
             path, options)
    engine = EngineServer.options(ray_actor_options=options.ray_actor_options()).bind(
        WeightSource(path=path), options)
    return Gateway.bind(engine, path, name, float(failover_timeout_s), api_key_digest)
