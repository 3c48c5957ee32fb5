"""The Serve application: gateway (gRPC and HTTP, CPU, stateless) -> engine deployment (each
replica is one engine's frontend: actors/serving/engine_server.py) -> the expert actors. By
default (`expert_pool: shared`) every engine replica uses the application's one shared expert
pool, owned by its ExpertPoolServer deployment (actors/serving/pool_server.py), which outlives
the replicas' restarts; with `expert_pool: per_replica` each replica owns its own expert actors,
which die with it. `serve run deploy/serve.yaml` calls `build_app(args)` with the config's
`args:`; one command serves a checkpoint with no config file:

    serve run deploy.app:build_app model=DIR dtype=bfloat16 device=cuda expert_replicas=2

There each value is a string, parsed by its option's type (actors/options.py: a number; JSON
for a mapping, e.g. expert_resources='{"GPU": 1, "CPU": 1}'; none for None). That form starts
Serve with its default gRPC options, which serve no API: it answers the OpenAI-compatible HTTP
API only (deploy/serve.yaml also configures gRPC on port 9000). The args:

    model:        checkpoint directory, served under its directory's name; omitted: the demo,
                  a `tiny` random checkpoint with the real tokenizer created once under
                  $MIXTRAL_EP_CACHE (its text is gibberish), served as "mixtral-ep-demo-tiny"
    demo:         the random preset served when `model` is omitted: `tiny` (the default;
                  Mixtral-8x7B's v1 vocabulary: tool calls only when forced by tool_choice) or
                  `tiny-v3` (the v3 vocabulary of Mixtral-8x22B-Instruct, with Mistral's tool
                  tokens: native tool calls), served as "mixtral-ep-demo-<preset>"
    api_key_env / api_key_file: the name of an environment variable, or a file, holding the API
                  key every gRPC and /v1 call must carry (`authorization: Bearer <key>`); read
                  here, only its digest reaches the gateways (actors/serving/auth.py)
    any EngineOptions field (actors/options.py, each with its meaning, unit and default;
                  `python -m actors.options` lists them). frontend_resources become the engine
                  replica's `ray_actor_options`, which a `deployments:` entry of a Serve config
                  replaces if it sets them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ray.serve import Application

from actors.options import EngineOptions
from actors.serving.auth import key_digest
from actors.serving.engine_server import GENERATOR_SERVICER, EngineServer
from actors.serving.gateway import Gateway
from actors.serving.pool_server import ExpertPoolServer
from model.checkpoint import WeightSource, check_checkpoint_dir
from model.random_checkpoint import cached_random_checkpoint

# a child of Serve's logger: its handlers (replica log files, the console of `serve run`) and
# its LoggingConfig apply; a plain module logger has no handler in a Serve process
log = logging.getLogger(f"ray.serve.{__name__}")

APP_ARGS = ("model", "demo", "api_key_env", "api_key_file")   # build_app's; the rest: EngineOptions
DEMO_PRESETS = ("tiny", "tiny-v3")                      # `demo=`: the random checkpoints served
DEMO_MODEL_ID = "mixtral-ep-demo-tiny"
# what Serve's gRPC proxy serves (`grpc_options.grpc_servicer_functions`; the Serve configs in
# deploy/ list the same, a test checks): first the hook that fixes the proxy's status codes (a
# dead gateway replica: UNAVAILABLE; a request that does not parse: INVALID_ARGUMENT, for the
# servicers after it: actors/serving/grpc_proxy.py), then our API and the standard health service
GRPC_SERVICER_FUNCTIONS = ["actors.serving.grpc_proxy.add_retryable_status_to_server",
                           GENERATOR_SERVICER,
                           "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
# how Serve must start its controller (`serve.start(controller_options=...)`, a Serve config's
# `controller_options:`; deploy/'s list the same, a test checks): its proxies inherit this env,
# whose callback sets the gRPC port's receive limit and keepalive policy before the proxy's
# server starts (actors/serving/grpc_port.py; its MIXTRAL_EP_GRPC_* variables may join it)
SERVE_CONTROLLER_OPTIONS = {"runtime_env": {"env_vars": {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH":
        "actors.serving.grpc_port.set_grpc_server_options"}}}


def serve_start_options(grpc_port: int, http_port: int) -> dict:
    """`serve.start(**serve_start_options(grpc_port, http_port))`: one proxy, on the head node,
    serving what deploy/serve.yaml serves (our gRPC API with the proxy's hooks, HTTP) on these
    ports, with the controller's env (SERVE_CONTROLLER_OPTIONS); the tests' and benches' Serve."""
    from ray.serve.config import gRPCOptions
    return {"proxy_location": "HeadOnly", "http_options": {"port": http_port},
            "grpc_options": gRPCOptions(port=grpc_port,
                                        grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
            "controller_options": SERVE_CONTROLLER_OPTIONS}


def build_app(args: dict) -> Application:
    """The application for these args (the module doc), every one checked here, before any
    replica starts: ValueError naming an unknown or bad arg, CheckpointError naming what a
    `model` directory lacks."""
    accepted = APP_ARGS + tuple(f.name for f in dataclasses.fields(EngineOptions))
    unknown = set(args) - set(accepted)
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; expected "
                         f"{', '.join(accepted)}")
    options = EngineOptions.from_args(args)
    api_key_digest = key_digest(args)          # now: a missing key fails the deploy at once
    demo = args.get("demo", "tiny")
    if demo not in DEMO_PRESETS or (args.get("model") and "demo" in args):
        raise ValueError(f"demo must be one of {', '.join(DEMO_PRESETS)}, and only without "
                         f"model; got demo={demo!r}" + (" with model" if args.get("model") else ""))
    path = args.get("model") or str(cached_random_checkpoint(demo))
    name = Path(path).name if args.get("model") else f"mixtral-ep-demo-{demo}"
    if args.get("model"):
        check_checkpoint_dir(path)             # now, not after replicas crash-loop on it
    options.weight_source(WeightSource(path=path)).resolve_dtype(options.dtype, options.device)
    log.info("serving %s as model %r with %s; the engine replica logs how to call it once it "
             "is ready", path, name, options)
    engine = engine_deployment(WeightSource(path=path), options, name, api_key_digest is not None)
    return Gateway.bind(engine, path, name, options.failover_timeout_s, api_key_digest)


def engine_deployment(source: WeightSource, options: EngineOptions, model_id: str | None = None,
                      api_key: bool = False, **deployment_options):
    """The bound engine deployment (EngineServer with `options.ray_actor_options()` and
    `deployment_options`, e.g. num_replicas), bound to the application's ExpertPoolServer when
    `options.expert_pool` is "shared" (actors/serving/pool_server.py)."""
    source = options.weight_source(source)
    pool = ExpertPoolServer.bind(source, options) if options.expert_pool == "shared" else None
    return EngineServer.options(ray_actor_options=options.ray_actor_options(),
                                **deployment_options).bind(source, options, model_id, api_key,
                                                           pool)
