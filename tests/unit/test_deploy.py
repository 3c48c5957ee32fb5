"""Deploy configs: `ray up` configs pass Ray's own validator, serve.yaml passes Serve's schema,
and every key of a cluster config carries a comment."""
from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ["deploy/cluster.yaml", "deploy/cluster-onprem.yaml"]


@pytest.mark.parametrize("name", CLUSTERS)
def test_cluster_config_passes_rays_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    broken = copy.deepcopy(raw)
    broken["provider"]["type"] = 42
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", CLUSTERS)
def test_every_cluster_key_is_commented(name):
    lines = (ROOT / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[\w~./-]+:", line) and not line.lstrip().startswith("#"):
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"{name}:{i + 1}: {line}"


@pytest.mark.parametrize("name", ["deploy/serve.yaml", "deploy/serve-gpu.yaml"])
def test_serve_config_matches_serves_schema_and_imports(name):
    from ray.serve.schema import ServeDeploySchema
    raw = yaml.safe_load((ROOT / name).read_text())
    config = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    assert config.grpc_options.port == 9000
    for path in config.grpc_options.grpc_servicer_functions:
        module, func = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), func))
    module, builder = config.applications[0].import_path.split(":")
    assert callable(getattr(importlib.import_module(module), builder))
