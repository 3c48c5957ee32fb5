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
starts. Blocks until Ctrl-C, which shuts Serve down.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("serve.yaml")


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
    parser.add_argument("--address", default=None,
                        help="the Ray cluster to run on (default: RAY_ADDRESS, else a local one)")
    ns = parser.parse_args(argv)
    try:
        config = config_with_args(yaml.safe_load(ns.config.read_text()),
                                  [absolute_model(a) for a in ns.args])
        if ns.address is None:
            from deploy.app import build_app  # the checks Serve's build task would run
            build_app(config["applications"][0]["args"])
    except (OSError, ValueError, yaml.YAMLError) as e:     # CheckpointError is a ValueError
        parser.error(str(e))
    from ray.serve.scripts import cli  # Serve's own `serve run`: its Ctrl-C and log stream
    with tempfile.TemporaryDirectory(prefix="mixtral-ep-serve-") as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = ["run", str(path)] + (["--address", ns.address] if ns.address else [])
        with contextlib.suppress(KeyboardInterrupt):     # serve run shut Serve down
            cli.main(args=command, prog_name="serve", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
