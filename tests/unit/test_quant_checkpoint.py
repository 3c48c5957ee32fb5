"""FP8 checkpoints on disk and the `quantization` option: the random FP8 writer's layout (the
published one, model/quant.py) and its CLI, and every bad value named with its field: an
unknown quantization, int8 on an FP8 checkpoint, a quantization_config this server does not
read, a missing or misshapen scale."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from actors.options import EngineOptions
from model import quant
from model.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    WeightSource,
    check_checkpoint_dir,
    quantization_config,
    random_tensor,
    weight_map,
)
from model.config import PRESETS, MixtralConfig
from model.engine import Engine
from model.mixtral import tensor_shapes
from model.moe import expert_name
from model.random_checkpoint import is_fp8_name

ROOT = Path(__file__).resolve().parents[2]
W1 = expert_name(0, 0, "w1")                    # model.layers.0.block_sparse_moe.experts.0.w1
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def scale_name(name: str, suffix: str) -> str:
    return name.removesuffix("weight") + suffix


def headers(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of a checkpoint: name -> (safetensors dtype, shape)."""
    out = {}
    for file in set(weight_map(path).values()):
        with safe_open(file, framework="pt") as f:
            out.update({n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape()))
                        for n in f.keys()})  # noqa: SIM118 - the handle is not iterable
    return out


def test_the_fp8_writer_writes_the_published_layout(tiny_fp8_checkpoint):
    """Every expert and attention projection float8_e4m3fn with a 0-d float32 weight_scale
    (max |w| / 448 of the random fp32 weight, which it dequantizes to within FP8's rounding)
    and input_scale; routers, lm_head, embedding and norms in --dtype (float32) without scales;
    config.json's quantization_config as AutoFP8 writes it."""
    cfg = MixtralConfig.from_json(tiny_fp8_checkpoint)
    shapes, found = tensor_shapes(cfg), headers(tiny_fp8_checkpoint)
    projections = {n for n in shapes if ".experts." in n or n.endswith(
        ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))}
    assert len(projections) == cfg.num_hidden_layers * (3 * cfg.num_local_experts + 4)
    assert projections == {n for n in shapes if is_fp8_name(n)}
    scales = {scale_name(n, s) for n in projections
              for s in (quant.WEIGHT_SCALE, quant.INPUT_SCALE)}
    assert set(found) == set(shapes) | scales
    for name, shape in shapes.items():
        assert found[name] == ("F8_E4M3" if name in projections else "F32", shape), name
    assert all(found[s] == ("F32", ()) for s in scales)
    with open(tiny_fp8_checkpoint / "config.json") as f:
        config = json.load(f)
    assert config["torch_dtype"] == "float32"
    assert config["quantization_config"] == {
        "quant_method": "fp8", "activation_scheme": "static",
        "ignored_layers": ["lm_head", *(f"model.layers.{i}.block_sparse_moe.gate"
                                       for i in range(cfg.num_hidden_layers))]}
    files = weight_map(tiny_fp8_checkpoint)
    for name in sorted(projections)[::7]:
        with safe_open(files[name], framework="pt") as f:
            q, scale = f.get_tensor(name), f.get_tensor(scale_name(name, quant.WEIGHT_SCALE))
            input_scale = f.get_tensor(scale_name(name, quant.INPUT_SCALE))
        w = random_tensor(name, shapes[name], 0, torch.float32)
        assert scale == w.abs().max() / quant.FP8_MAX and 0 < input_scale < math.inf
        err = (q.float() * scale - w).abs()
        assert (err <= 2.0 ** -4 * w.abs() + 2.0 ** -10 * scale).all(), name


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.checkpoint", "random", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_cli_writes_the_same_fp8_checkpoint(tiny_fp8_checkpoint, tmp_path):
    done = run_cli("--preset", "tiny", "--quantization", "fp8", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    for file in [*tmp_path.glob("*.safetensors"), tmp_path / "config.json", tmp_path / INDEX_FILE]:
        assert file.read_bytes() == (tiny_fp8_checkpoint / file.name).read_bytes(), file.name


def test_the_cli_names_the_quantizations_it_writes(tmp_path):
    done = run_cli("--preset", "tiny", "--quantization", "int8", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "--quantization" in done.stderr and "'fp8'" in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


BAD_QUANTIZATION = [
    lambda path: WeightSource(path=str(path), quantization="int4"),
    lambda path: Engine.from_pretrained(path, quantization="int4"),
    lambda path: Engine.from_config("tiny", quantization="int4"),
    lambda path: EngineOptions(quantization="int4"),
    lambda path: EngineOptions.from_args({"quantization": "int4"}),
    lambda path: EngineOptions(engine_args={"quantization": "int4"})]


@pytest.mark.parametrize("make", BAD_QUANTIZATION)
def test_an_unknown_quantization_is_named_with_the_choices(tiny_checkpoint, make):
    with pytest.raises(ValueError, match=r"quantization must be .*'int8'.*got 'int4'"):
        make(tiny_checkpoint)


def test_engine_args_quantization_is_lifted_into_the_option(tiny_checkpoint):
    """vLLM's engine-args name, typed (a YAML config) or as JSON (the `serve run` line)."""
    for args in ({"engine_args": {"quantization": "int8", "max_num_seqs": 4}},
                 {"engine_args": '{"quantization": "int8", "max_num_seqs": 4}'},
                 {"quantization": "int8", "engine_args": {"quantization": "int8",
                                                          "max_num_seqs": 4}}):
        options = EngineOptions.from_args(args)
        assert (options.quantization, options.engine_args) == ("int8", {"max_num_seqs": 4})
    assert EngineOptions(engine_args={"quantization": "int8"}).engine_args is None
    assert EngineOptions.from_args({"quantization": "none"}).quantization is None
    plain = WeightSource(path=str(tiny_checkpoint))
    assert EngineOptions(quantization="int8").weight_source(plain).quantization == "int8"
    with pytest.raises(ValueError, match="quantization='int8' and engine_args.quantization="
                                         "'int4' differ"):
        EngineOptions(quantization="int8", engine_args={"quantization": "int4"})


@pytest.mark.parametrize("make", [
    lambda path: WeightSource(path=str(path), quantization="int8"),
    lambda path: Engine.from_pretrained(path, quantization="int8"),
    lambda path: EngineOptions(quantization="int8").weight_source(WeightSource(path=str(path)))])
def test_int8_on_an_fp8_checkpoint_is_refused(tiny_fp8_checkpoint, make):
    with pytest.raises(ValueError, match="quantization='int8': the checkpoint .* is already "
                                         "quantized"):
        make(tiny_fp8_checkpoint)


def variant(src: Path, out: Path, config: dict | None = None, drop: str | None = None,
            extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of checkpoint `src` (its files linked) with config.json's quantization_config
    updated by `config`, tensor `drop` gone from the index, and `extra` tensors in a shard of
    their own that the index names for them (replacing the originals)."""
    for file in src.iterdir():
        if file.name not in ("config.json", INDEX_FILE):
            (out / file.name).symlink_to(file)
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"].update(config or {})
    (out / "config.json").write_text(json.dumps(raw))
    index = json.loads((src / INDEX_FILE).read_text())
    index["weight_map"].pop(drop, None)
    if extra:
        save_file(extra, out / "extra.safetensors")
        index["weight_map"].update(dict.fromkeys(extra, "extra.safetensors"))
    (out / INDEX_FILE).write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
    ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "compressed-tensors"}, "quant_method 'compressed-tensors' is not supported"),
    ({"weight_block_size": [128, 128]}, "weight_block_size: block-wise FP8 is not supported"),
    ({"activation_scheme": "per-token"}, "activation_scheme 'per-token'")])
def test_an_unsupported_quantization_config_is_named(tiny_fp8_checkpoint, tmp_path, config,
                                                     message):
    """Before serving (check_checkpoint_dir), and by the engine that would load it."""
    path = variant(tiny_fp8_checkpoint, tmp_path, config)
    for check in (quantization_config, check_checkpoint_dir, Engine.from_pretrained):
        with pytest.raises(CheckpointError, match=f"quantization_config.{message}"):
            check(path)


@pytest.mark.parametrize("name, drop, extra, message", [
    (W1, scale_name(W1, quant.WEIGHT_SCALE), None,
     f"FP8 tensor '{W1}' has no '{scale_name(W1, quant.WEIGHT_SCALE)}'"),
    (Q_PROJ, None, {scale_name(Q_PROJ, quant.WEIGHT_SCALE): torch.ones(3)},
     f"{Q_PROJ}: weight_scale has shape \\(3,\\): expected one value or one per output channel"),
    (W1, None, {scale_name(W1, quant.INPUT_SCALE): torch.ones(2)},
     f"{W1}: input_scale has shape \\(2,\\): expected one value"),
    (W1, scale_name(W1, quant.INPUT_SCALE), None,
     f"FP8 tensor '{W1}' has no '{scale_name(W1, quant.INPUT_SCALE)}', which config.json's "
     f"activation_scheme 'static' needs")])
def test_a_missing_or_misshapen_scale_is_named_with_its_tensor(tiny_fp8_checkpoint, tmp_path,
                                                               name, drop, extra, message):
    """Before serving (check_checkpoint_dir, from the shards' headers) and when loaded."""
    path = variant(tiny_fp8_checkpoint, tmp_path, drop=drop, extra=extra)
    with pytest.raises(CheckpointError, match=message):
        check_checkpoint_dir(path)
    with pytest.raises(CheckpointError, match=message):
        WeightSource(path=str(path)).load([name], torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.01])
@pytest.mark.parametrize("which", [quant.WEIGHT_SCALE, quant.INPUT_SCALE])
def test_a_scale_that_is_not_finite_and_positive_is_named_when_loaded(tiny_fp8_checkpoint,
                                                                      tmp_path, bad, which):
    """A NaN scale made every request fail later ("logits are not finite"); zero or negative
    ones were taken silently. check_checkpoint_dir reads headers only: the values at load."""
    path = variant(tiny_fp8_checkpoint, tmp_path, extra={scale_name(W1, which): torch.tensor(bad)})
    with pytest.raises(CheckpointError, match=f"{W1}: {which} must be finite and > 0"):
        WeightSource(path=str(path)).load([W1], torch.float32)


def test_a_weight_stored_as_integers_or_missing_from_its_shard_is_named(tiny_fp8_checkpoint,
                                                                         tmp_path):
    """An I8 weight was read as float values (garbage text); an index naming a shard that lacks
    the tensor gave safetensors' raw error: both named, before serving and at load."""
    rows, cols = tensor_shapes(MixtralConfig.from_json(tiny_fp8_checkpoint))[W1]
    (tmp_path / "ints").mkdir()
    ints = variant(tiny_fp8_checkpoint, tmp_path / "ints",
                   extra={W1: torch.ones(rows, cols, dtype=torch.int8)})
    for check in (check_checkpoint_dir, lambda p: WeightSource(path=str(p)).load([W1],
                                                                                 torch.float32)):
        with pytest.raises(CheckpointError, match=f"tensor '{W1}' is stored as I8"):
            check(ints)
    (tmp_path / "stale").mkdir()
    stale = variant(tiny_fp8_checkpoint, tmp_path / "stale", extra={"unused": torch.ones(1)})
    index = json.loads((stale / INDEX_FILE).read_text())
    index["weight_map"][W1] = "extra.safetensors"
    (stale / INDEX_FILE).write_text(json.dumps(index))
    for check in (check_checkpoint_dir, lambda p: WeightSource(path=str(p)).load([W1],
                                                                                 torch.float32)):
        with pytest.raises(CheckpointError, match=f"shard extra.safetensors for tensor '{W1}', "
                                                  f"which that shard does not hold"):
            check(stale)


def test_int8_on_fp8_tensors_without_a_quantization_config_is_refused(tiny_fp8_checkpoint,
                                                                      tmp_path):
    """F8_E4M3 tensors with no quantization_config are read as FP8 (leniently); int8 on them
    crashed with an AttributeError: now a CheckpointError naming the tensor."""
    path = variant(tiny_fp8_checkpoint, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    del raw["quantization_config"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=f"quantization='int8': '{W1}' is stored quantized"):
        WeightSource(path=str(path), quantization="int8").load([W1], torch.float32)


def test_per_channel_scales_are_read_too(tiny_fp8_checkpoint, tmp_path):
    """A (out, 1) weight_scale (llm-compressor's channel-wise FP8) is one scale per row."""
    files = weight_map(tiny_fp8_checkpoint)
    with safe_open(files[W1], framework="pt") as f:
        scale = f.get_tensor(scale_name(W1, quant.WEIGHT_SCALE))
    rows = MixtralConfig.from_json(tiny_fp8_checkpoint).intermediate_size
    per_row = scale * torch.linspace(1, 2, rows)[:, None]                    # (out, 1)
    path = variant(tiny_fp8_checkpoint, tmp_path,
                   extra={scale_name(W1, quant.WEIGHT_SCALE): per_row})
    check_checkpoint_dir(path)
    [got] = WeightSource(path=str(path)).load([W1], torch.float32).values()
    assert torch.equal(got.scale, per_row[:, 0])


def test_an_engine_on_a_pool_of_another_model_or_quantization_is_refused(tiny_checkpoint,
                                                                      tiny_fp8_checkpoint):
    """RayEngine._on_pool (actors/engine.py), without Ray: the pool's expert actors hold the
    experts' weights, so an engine asking for other ones fails before its frontend starts."""
    import dataclasses
    import types

    from actors.engine import RayEngine

    def on_pool(mine: WeightSource, pools: WeightSource):
        options = {s: EngineOptions(dtype="float32", quantization=s.quantization)
                   for s in (mine, pools)}
        pool = types.SimpleNamespace(source=pools, name="mixtral-ep-pool:t",
                                     options=options[pools])
        RayEngine._on_pool(mine, options[mine], pool, tokenizer=None)

    tiny, fp8 = WeightSource(path=str(tiny_checkpoint)), WeightSource(path=str(tiny_fp8_checkpoint))
    int8 = dataclasses.replace(tiny, quantization="int8")
    for mine, pools, names in ((int8, tiny, "'int8' differs from the pool's 'none'"),
                               (tiny, int8, "'none' differs from the pool's 'int8'"),
                               (fp8, int8, "'fp8' differs from the pool's 'int8'"),
                               (tiny, fp8, "'none' differs from the pool's 'fp8'")):
        with pytest.raises(ValueError, match=f"quantization {names}"):
            on_pool(mine, pools)
    small = WeightSource(config=PRESETS["small"])
    with pytest.raises(ValueError, match="is not the pool's .*config.json differ"):
        on_pool(tiny, small)
