"""Deploy configs: `ray up` configs pass Ray's own validator, serve.yaml passes Serve's schema,
and every key of a cluster config carries a comment."""
from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ["deploy/cluster.yaml", "deploy/cluster-onprem.yaml"]


@pytest.mark.parametrize("name", CLUSTERS)
def test_cluster_config_passes_rays_validator(name):
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    broken = copy.deepcopy(raw)
    broken["provider"]["type"] = 42
    with pytest.raises(NotImplementedError, match="Unsupported node provider: 42"):
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


def test_the_engine_replica_asks_for_the_frontends_resources(monkeypatch):
    """The replica is the frontend: its ray_actor_options are what the frontend needs, with
    the short OpenMP spin on CPU (actors/experts/pool.py), unless the user set their own."""
    from actors.options import EngineOptions
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    cpu_env = {"runtime_env": {"env_vars": {"GOMP_SPINCOUNT": "30000"}}}
    assert EngineOptions(device="cuda").ray_actor_options() == {
        "num_cpus": 1, "num_gpus": 1, "resources": {}}
    assert EngineOptions().ray_actor_options() == {
        "num_cpus": 0.01, "num_gpus": 0, "resources": {}, **cpu_env}
    assert EngineOptions(frontend_resources={"CPU": 0.5, "frontend": 1}).ray_actor_options() == {
        "num_cpus": 0.5, "num_gpus": 0, "resources": {"frontend": 1}, **cpu_env}
    monkeypatch.setenv("GOMP_SPINCOUNT", "100")
    assert "runtime_env" not in EngineOptions().ray_actor_options()


@pytest.mark.parametrize("field, value, says", [
    ("frontend_threads", 0, "must be a positive integer or None"),
    ("expert_threads", -2, "must be a positive integer or None"),
    ("expert_threads", 1.5, "must be a positive integer or None"),
    ("frontend_threads", True, "must be a positive integer or None"),
    ("transport", "bogus", "must be one of"), ("dtype", "fp8", "must be 'auto' or one of")])
def test_engine_args_are_checked_before_anything_starts(field, value, says):
    from deploy.app import build_app
    with pytest.raises(ValueError, match=rf"{field} {says}.*{value!r}"):
        build_app({"model": "unused", field: value})


@pytest.mark.parametrize("value, says", [
    ({"max_replicas": 3}, "exactly one of target_rows_per_s and target_load_ratio"),
    ({"target_load_ratio": 1.5, "window": 60}, r"unknown expert_autoscaling keys \['window'\]"),
    ({"target_load_ratio": 1.5, "min_replicas": 0}, "expert_autoscaling.min_replicas must be"),
    ([1, 2], "expert_autoscaling must be a mapping")])
def test_expert_autoscaling_is_checked_before_anything_starts(value, says):
    from deploy.app import build_app
    with pytest.raises(ValueError, match=says):
        build_app({"model": "unused", "expert_autoscaling": value})


@pytest.mark.parametrize("args, says", [
    ({"demo": "tiny-v2"}, r"demo must be one of tiny, tiny-v3.*got demo='tiny-v2'"),
    ({"model": "unused", "demo": "tiny-v3"}, "only without model")])
def test_the_demo_preset_is_checked_before_anything_starts(args, says):
    from deploy.app import build_app
    with pytest.raises(ValueError, match=says):
        build_app(args)


def test_the_gpu_config_gives_the_engine_replica_its_gpu():
    app = yaml.safe_load((ROOT / "deploy/serve-gpu.yaml").read_text())["applications"][0]
    [engine] = [d for d in app["deployments"] if d["name"] == "EngineServer"]
    assert engine["ray_actor_options"]["num_gpus"] == 1
    assert engine["ray_actor_options"]["resources"] == {"frontend": 1}
    assert "frontend_resources" not in app["args"]      # one place says it: the deployment's


class _Bound:
    """Stands in for a deployment: records `.options(...)` and `.bind(...)`."""
    def __init__(self, calls: dict, name: str):
        self.calls, self.name = calls, name

    def options(self, **options):
        self.calls[f"{self.name}.options"] = options
        return self

    def bind(self, *args):
        self.calls[f"{self.name}.bind"] = args
        return self.name


def test_one_command_serve_parses_its_string_args_by_each_options_type(tiny_checkpoint,
                                                                       monkeypatch):
    """`serve run deploy.app:build_app model=DIR key=value ...` passes every value as a string."""
    import deploy.app as app
    calls = {}
    monkeypatch.setattr(app, "EngineServer", _Bound(calls, "engine"))
    monkeypatch.setattr(app, "Gateway", _Bound(calls, "gateway"))
    monkeypatch.setattr(app, "ExpertPoolServer", _Bound(calls, "pool"))
    args = {"model": str(tiny_checkpoint), "dtype": "bfloat16", "expert_replicas": "2",
            "expert_resources": '{"CPU": 1, "expert": 1}', "frontend_threads": "none",
            "engine_args": '{"max_num_seqs": 8}', "failover_timeout_s": "30"}
    assert app.build_app(args) == "gateway"
    source, options, model_id, api_key, pool = calls["engine.bind"]
    assert pool == "pool" and calls["pool.bind"] == (source, options)   # shared: the default
    assert (options.dtype, options.expert_replicas, options.frontend_threads) == ("bfloat16", 2,
                                                                                  None)
    assert options.expert_resources == {"CPU": 1, "expert": 1}
    assert options.engine_args == {"max_num_seqs": 8}
    assert (source.path, model_id, api_key) == (str(tiny_checkpoint), tiny_checkpoint.name, False)
    calls.clear()
    app.build_app({**args, "expert_pool": "per_replica"})
    assert calls["engine.bind"][4] is None and "pool.bind" not in calls
    assert calls["gateway.bind"] == ("engine", str(tiny_checkpoint), tiny_checkpoint.name, 30.0,
                                     None)


@pytest.mark.parametrize("arg, text, says", [
    ("expert_replicas", "two", "expert_replicas expects an integer, got 'two'"),
    ("expert_resources", "GPU:1", "expert_resources expects a JSON object"),
    ("failover_timeout_s", "-1", "failover_timeout_s must be a positive number of seconds")])
def test_a_bad_string_arg_names_itself_before_anything_starts(arg, text, says):
    from deploy.app import build_app
    with pytest.raises(ValueError, match=re.escape(says)):
        build_app({"model": "unused", arg: text})


def test_the_ready_line_names_the_model_and_the_commands_to_call_it():
    from actors.serving.engine_server import ready_banner
    text = ready_banner("my-model", 8, "localhost:9000", "localhost:8000")
    assert "engine replica ready: model 'my-model'" in text
    assert 'python -m protos.client "Hello" --address localhost:9000' in text
    assert "curl http://localhost:8000/v1/models" in text
    chat = next(line for line in text.splitlines() if "/v1/chat/completions" in line)
    body = json.loads(chat.split(" -d ", 1)[1].strip("'"))
    assert body["model"] == "my-model" and body["messages"][0]["role"] == "user"
    assert text.splitlines()[1] == "=" * 78                 # framed: it stands out
    without_grpc = ready_banner("m", 2, None, "localhost:8000", api_key=True)
    assert "protos.client" not in without_grpc and "not served here" in without_grpc
    assert without_grpc.count("Authorization: Bearer $MIXTRAL_EP_API_KEY") == 2


def test_unknown_application_args_are_refused():
    from deploy.app import build_app
    with pytest.raises(ValueError, match=r"unknown application args \['frontend'\]"):
        build_app({"model": "/nowhere", "frontend": {"GPU": 1}})


@pytest.mark.parametrize("name", ["deploy/serve.yaml", "deploy/serve-gpu.yaml"])
def test_serve_configs_serve_the_api_and_the_health_service(name):
    """...with the proxy's fixes first (they wrap the servicers registered after them), and the
    controller env that sets the gRPC port's limits in every proxy."""
    from deploy.app import GRPC_SERVICER_FUNCTIONS, SERVE_CONTROLLER_OPTIONS
    raw = yaml.safe_load((ROOT / name).read_text())
    assert raw["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    assert GRPC_SERVICER_FUNCTIONS[0].endswith("grpc_proxy.add_retryable_status_to_server")
    assert raw["controller_options"] == SERVE_CONTROLLER_OPTIONS


def test_the_controller_env_names_the_grpc_port_callback():
    from ray.serve.config import ControllerOptions

    from deploy.app import SERVE_CONTROLLER_OPTIONS
    env = ControllerOptions(**SERVE_CONTROLLER_OPTIONS).runtime_env["env_vars"]
    module, func = env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), func))


def _edit_config(path: Path, **fields) -> None:
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(raw | fields))


def _drop_tensor_from_index(path: Path) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["lm_head.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("breakage, says", [
    (lambda p: shutil.rmtree(p), "is not a directory"),
    (lambda p: (p / "config.json").unlink(), "has no config.json"),
    (lambda p: _edit_config(p, hidden_size="big"), "hidden_size"),
    (lambda p: [(p / f).unlink() for f in ("tokenizer.json", "tokenizer.model")],
     "has no tokenizer.json or tokenizer.model"),
    (lambda p: (p / "model.safetensors.index.json").unlink(), "no model.safetensors.index.json"),
    (lambda p: next(p.glob("model-00002-*.safetensors")).unlink(), "missing 1 shard"),
    (_drop_tensor_from_index, "has no tensor 'lm_head.weight'"),
])
def test_build_app_refuses_a_model_path_naming_what_is_missing(tiny_checkpoint, tmp_path,
                                                               breakage, says):
    """At once, before any replica starts (they used to crash-loop on it for minutes)."""
    from deploy.app import build_app
    from model.checkpoint import CheckpointError
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    breakage(path)
    with pytest.raises(CheckpointError, match=re.escape(says)):
        build_app({"model": str(path)})


def _group_nodes(group: dict, count: int) -> list:
    """Planner nodes for `count` pods of a KubeRay worker group (its rayStartParams' GPUs and
    custom resources, its container's CPU limit)."""
    from cluster.plan import Node
    params = group["rayStartParams"]
    resources = json.loads(json.loads(params.get("resources", '"{}"')))
    cpu = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    return [Node(f"{group['groupName']}-{i}",
                 {**resources, "GPU": float(params.get("num-gpus", 0)), "CPU": cpu})
            for i in range(count)]


def test_the_rayservice_manifest_holds_a_valid_serve_config_and_the_planned_actors():
    from ray.serve.schema import ServeDeploySchema

    from cluster.plan import plan
    from deploy.app import GRPC_SERVICER_FUNCTIONS, SERVE_CONTROLLER_OPTIONS
    doc = yaml.safe_load((ROOT / "deploy/rayservice.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert config.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    assert config.controller_options.model_dump() == SERVE_CONTROLLER_OPTIONS
    http, grpc_port = config.http_options.port, config.grpc_options.port
    service_ports = {p["name"]: p["port"] for p in doc["spec"]["serveService"]["spec"]["ports"]}
    assert service_ports == {"serve": http, "grpc": grpc_port}
    cluster = doc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {http, grpc_port} <= {p["containerPort"] for p in head["ports"]}
    assert head["readinessProbe"]["httpGet"] == {"path": "/health", "port": http}
    [app] = config.applications
    gpu = yaml.safe_load((ROOT / "deploy/serve-gpu.yaml").read_text())["applications"][0]["args"]
    assert {k: v for k, v in app.args.items() if k != "model"} == \
        {k: v for k, v in gpu.items() if k != "model"}
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:                            # build_app runs on the head; replicas anywhere
        mounts = [m["mountPath"] for c in pod["template"]["spec"]["containers"]
                  for m in c.get("volumeMounts", [])]
        assert any(app.args["model"].startswith(m + "/") for m in mounts), pod.get("groupName")
    engine = next(d for d in app.deployments if d.name == "EngineServer")
    options = engine.ray_actor_options
    frontend = {"CPU": options.num_cpus, "GPU": options.num_gpus, **options.resources}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for size in ("replicas", "maxReplicas"):     # as deployed, and scaled out for 2 replicas
        nodes = [n for g in groups.values() for n in _group_nodes(g, g[size])]
        replicas = app.args["expert_replicas"] * (2 if size == "maxReplicas" else 1)
        p = plan(nodes, 8, replicas, app.args["expert_resources"], frontend)
        assert p.frontend.node_id.startswith("gpu-frontend") and not p.shared
        assert all(s.node_id.startswith("gpu-experts") for _, s in p.actors())


def test_the_grafana_dashboard_plots_every_engine_metric_and_only_those():
    """deploy/grafana-dashboard.json queries Ray's exported names (`ray_` prefix; counters
    `_total`, histograms `_bucket`) of exactly the metrics actors/serving/metrics.py and
    pool_metrics.py (the expert pool's) define."""
    source = "".join((ROOT / "actors/serving" / f).read_text()
                     for f in ("metrics.py", "pool_metrics.py"))
    defined = set(re.findall(r'm\.\w+\(\s*"(mixtral_ep_\w+)"', source))
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {re.sub(r"_(total|bucket)$", "", name)
               for e in exprs for name in re.findall(r"ray_(mixtral_ep_\w+)", e)}
    assert len(defined) == 23 and queried == defined


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
                       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
                       max_size=5))
def test_the_one_command_serve_sets_each_key_value_in_the_configs_args(given_args):
    """mixtral-ep-serve (deploy/__main__.py): serve.yaml with each KEY=VALUE, as a string, in
    its application's args (over the file's own), everything else of the config unchanged."""
    from deploy.__main__ import DEFAULT_CONFIG, config_with_args
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    merged = config_with_args(config, [f"{k}={v}" for k, v in given_args.items()])
    assert merged["applications"][0]["args"] == {**config["applications"][0]["args"], **given_args}
    assert {k: v for k, v in merged.items() if k != "applications"} == \
        {k: v for k, v in config.items() if k != "applications"}
    assert yaml.safe_load(yaml.safe_dump(merged)) == merged     # strings stay strings


@pytest.mark.parametrize("bad,expected", [
    (["model"], "KEY=VALUE"), (["=x"], "KEY=VALUE"),
    (["expert_replica=2"], "unknown application args ['expert_replica']"),
    (["expert_replicas=two"], "expert_replicas expects an integer, got 'two'"),
    (["model=no/such/dir"], "no/such/dir")])
def test_the_one_command_serve_names_a_bad_argument_before_starting(bad, expected, capsys,
                                                                   monkeypatch, tmp_path):
    """Exit 2 and the argument named, from the args alone: Serve's build task would only log
    the failure while `serve run` waited on."""
    from deploy.__main__ import main
    monkeypatch.setenv("MIXTRAL_EP_CACHE", str(tmp_path))       # the demo model, if built
    with pytest.raises(SystemExit) as exit_:
        main(bad)
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("args, env, expected", [
    (["--graceful-shutdown-timeout-s", "nan"], {}, "--graceful-shutdown-timeout-s must be a"),
    (["--graceful-shutdown-timeout-s", "inf"], {}, "--graceful-shutdown-timeout-s must be a"),
    (["--graceful-shutdown-timeout-s", "-1"], {}, "--graceful-shutdown-timeout-s must be a"),
    ([], {"MIXTRAL_EP_GRPC_MAX_RECEIVE_BYTES": "12"}, "MIXTRAL_EP_GRPC_MAX_RECEIVE_BYTES must"),
    ([], {"MIXTRAL_EP_GRPC_MIN_PING_INTERVAL_MS": "x"}, "MIXTRAL_EP_GRPC_MIN_PING_INTERVAL_MS")])
def test_the_one_command_serve_names_a_bad_grace_or_port_setting_before_starting(
        args, env, expected, capsys, monkeypatch, tmp_path):
    """A NaN or infinite grace (Serve refused NaN with a traceback, and would wait forever on
    inf) and a bad gRPC port variable (the proxy failed to start, a 160-line log) exit 2
    naming it, before Ray starts."""
    from deploy.__main__ import main
    monkeypatch.setenv("MIXTRAL_EP_CACHE", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_the_one_command_serve_takes_a_relative_model_from_the_current_directory(
        tmp_path, monkeypatch):
    from deploy.__main__ import absolute_model
    monkeypatch.chdir(tmp_path)
    assert absolute_model("model=ckpt") == f"model={tmp_path / 'ckpt'}"
    (tmp_path / "named").symlink_to(tmp_path)                 # a link's name is the model's
    assert absolute_model("model=named/") == f"model={tmp_path / 'named'}"
    assert absolute_model("model=./a/../named") == f"model={tmp_path / 'named'}"
    assert absolute_model("dtype=float32") == "dtype=float32"
    assert absolute_model("model=") == "model="
