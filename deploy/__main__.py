"""Serve a checkpoint with one command, over gRPC (port 9000) and HTTP (port 8000):

    mixtral-ep-serve model=DIR dtype=bfloat16 device=cuda expert_replicas=2
    python -m deploy model=DIR                     # the same
    mixtral-ep-serve --config deploy/serve-gpu.yaml model=DIR   # another base config

It is `serve run` of a Serve config: `deploy/serve.yaml` (proxies, gRPC servicers, logging,
deployments) with each KEY=VALUE set in its application's `args` as a string, which `build_app`
parses by its option's type (deploy/app.py, actors/options.py). `serve run IMPORT_PATH
key=value` alone would start Serve without the gRPC servicers. A relative `model=DIR` is taken
from the current directory. The args are checked here first, as `build_app` checks them
(unless `--address` names another cluster, whose paths may differ): exit status 2 and a message
naming a malformed, unknown or bad argument or what a `model` directory lacks, before Ray
starts. Blocks until Ctrl-C, which drains the application's replicas first (each refuses new
requests with UNAVAILABLE / 503, lets requests in flight finish within its deployment's
`graceful_shutdown_timeout_s` and ends the rest with an error: actors/serving/draining.py),
then shuts Serve down; a second Ctrl-C stops at once. `--graceful-shutdown-timeout-s` sets
that grace on every deployment of the config.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

import yaml

log = logging.getLogger("mixtral-ep-serve")

DEFAULT_CONFIG = Path(__file__).with_name("serve.yaml")
DRAIN_SLACK_S = 5.0          # past the grace: the replicas' __del__ (expert actors stopped)


def config_with_args(config: dict, args: list[str]) -> dict:
    """`config` (a Serve config with one application) with each "key=value" of `args` set in
    its application's args. ValueError names an argument without "=" or with an empty key, or
    a config whose application count is not one."""
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"the config must hold exactly one application, it holds {len(apps)}")
    merged = dict(apps[0].get("args") or {})
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"arguments are KEY=VALUE (e.g. model=/path/to/checkpoint), "
                             f"got {arg!r}")
        merged[key] = value
    return {**config, "applications": [{**apps[0], "args": merged}]}


def absolute_model(arg: str) -> str:
    """"model=DIR" with DIR absolute (Serve builds the application in another process and
    directory) but links not followed (the served model's name is the directory's, as named);
    any other argument unchanged."""
    key, sep, value = arg.partition("=")
    if key != "model" or not value:
        return arg
    return f"model={os.path.abspath(os.path.expanduser(value))}"   # a link keeps its name


def with_grace(config: dict, grace_s: float | None) -> dict:
    """`config` with `graceful_shutdown_timeout_s` = `grace_s` (seconds, >= 0) on each of its
    application's deployments (unchanged for None). ValueError names a negative grace."""
    if grace_s is None:
        return config
    if not 0 <= grace_s < math.inf:          # NaN fails both
        raise ValueError(f"--graceful-shutdown-timeout-s must be a finite number >= 0, got "
                         f"{grace_s:g}")
    app = config["applications"][0]
    deployments = [{**d, "graceful_shutdown_timeout_s": grace_s}
                   for d in app.get("deployments") or []]
    return {**config, "applications": [{**app, "deployments": deployments}]}


def drain_time_s(config: dict) -> float:
    """How long a drain of `config`'s application may take (seconds): its longest grace and
    wait loop (the deployments' defaults where unset: actors/serving/draining.py), plus
    DRAIN_SLACK_S."""
    deployments = config["applications"][0].get("deployments") or [{}]
    from actors.serving.draining import GRACE_S, WAIT_LOOP_S
    return (max(d.get("graceful_shutdown_timeout_s", GRACE_S) for d in deployments)
            + max(d.get("graceful_shutdown_wait_loop_s", WAIT_LOOP_S) for d in deployments)
            + DRAIN_SLACK_S)


def drain_replicas(app: str, timeout_s: float) -> int:
    """Begin Serve's graceful shutdown of every replica of application `app` at once (Serve's
    replica actor method `perform_graceful_shutdown`, the one its controller calls when it
    stops a replica) and wait up to `timeout_s` seconds for all to finish it, while Serve's
    proxies still answer; -> how many replicas did not finish in time. Not the shared expert
    pool's owner: its engine replicas' long polls would keep it busy for all of `timeout_s`
    (routing still reaches it here), and the draining streams need its experts; Serve's
    shutdown stops it after them."""
    import ray
    from ray.serve._private.common import ReplicaID
    from ray.serve._private.constants import SERVE_NAMESPACE

    from actors.serving.pool_server import ExpertPoolServer

    def drained(name: str) -> bool:     # the pool owner serves no client: it goes last, with
        deployment = ReplicaID.from_full_id_str(name).deployment_id     # Serve's shutdown
        return deployment.app_name == app and deployment.name != ExpertPoolServer.name
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == SERVE_NAMESPACE and ReplicaID.is_full_id_str(a["name"])
             and drained(a["name"])]
    refs = [ray.get_actor(name, namespace=SERVE_NAMESPACE).perform_graceful_shutdown.remote()
            for name in names]
    log.warning("Ctrl-C: draining %d replicas of %r for up to %.0f s (Ctrl-C again to stop at "
                "once)", len(refs), app, timeout_s)
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    return len(pending)


def drain_on_ctrl_c(app: str, timeout_s: float) -> None:
    """Make the first SIGINT drain `app` (drain_replicas) before `serve run`'s KeyboardInterrupt
    shuts Serve down (which would kill its proxies at once, cutting every stream); a second
    SIGINT raises KeyboardInterrupt at once."""
    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            import ray
            if ray.is_initialized():
                late = drain_replicas(app, timeout_s)
                if late:
                    log.warning("%d replicas did not drain within %.0f s", late, timeout_s)
        except Exception as e:  # noqa: BLE001 - a failed drain still shuts Serve down
            log.warning("could not drain %r: %r", app, e)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mixtral-ep-serve",
        description="Serve a checkpoint over gRPC (port 9000) and HTTP (port 8000) until Ctrl-C: "
                    "`serve run` of deploy/serve.yaml with these application args.",
        epilog="Options: model (a checkpoint directory; omitted: the demo model), api_key_env, "
               "api_key_file, and every engine option: `python -m actors.options` lists them.")
    parser.add_argument("args", nargs="*", metavar="KEY=VALUE",
                        help="an application arg, e.g. model=DIR dtype=bfloat16 device=cuda")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="the Serve config to start from (default: %(default)s)")
    parser.add_argument("--graceful-shutdown-timeout-s", type=float, default=None,
                        metavar="S", help="how long requests in flight may run after Ctrl-C "
                        "(seconds; default: the config's, 30 s in deploy/serve.yaml)")
    parser.add_argument("--address", default=None,
                        help="the Ray cluster to run on (default: RAY_ADDRESS, else a local one)")
    ns = parser.parse_args(argv)
    try:
        config = with_grace(config_with_args(yaml.safe_load(ns.config.read_text()),
                                             [absolute_model(a) for a in ns.args]),
                            ns.graceful_shutdown_timeout_s)
        if ns.address is None:
            from actors.serving.grpc_port import server_options
            from deploy.app import build_app  # the checks Serve's build task would run
            build_app(config["applications"][0]["args"])
            server_options()                  # the proxy's env (MIXTRAL_EP_GRPC_*), as it will
    except (OSError, ValueError, yaml.YAMLError) as e:     # CheckpointError is a ValueError
        parser.error(str(e))
    from ray.serve.scripts import cli  # Serve's own `serve run`: its Ctrl-C and log stream
    with tempfile.TemporaryDirectory(prefix="mixtral-ep-serve-") as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = ["run", str(path)] + (["--address", ns.address] if ns.address else [])
        drain_on_ctrl_c(config["applications"][0]["name"], drain_time_s(config))
        with contextlib.suppress(KeyboardInterrupt):     # serve run shut Serve down
            cli.main(args=command, prog_name="serve", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
