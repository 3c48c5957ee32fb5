"""Reading only the tensors asked for, clear errors on broken checkpoints, dtype resolution;
writing random checkpoints is tests/unit/test_random_checkpoint.py."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import model.checkpoint as ckpt
from model import linear
from model.checkpoint import CheckpointError, load_tensors, random_tensor
from model.config import PRESETS, ConfigError, MixtralConfig
from model.engine import Engine
from model.mixtral import expert_names, non_expert_names, tensor_shapes
from model.random_checkpoint import write_random


def test_random_tensors_are_seeded_per_name():
    w1 = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    a = random_tensor(w1.format(3), (4, 8), 7, torch.float32)
    b = random_tensor(w1.format(3), (4, 8), 7, torch.float32)
    c = random_tensor(w1.format(4), (4, 8), 7, torch.float32)
    d = random_tensor(w1.format(3), (4, 8), 8, torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_from_config_equals_written_checkpoint(tiny_checkpoint):
    from_files = Engine.from_pretrained(tiny_checkpoint)
    in_memory = Engine.from_config("tiny", seed=0)
    ids = [1, 415, 2936, 9060, 285, 1142]
    assert torch.equal(from_files.logits(ids), in_memory.logits(ids))


class _SpyOpen:
    """Wraps safetensors.safe_open and records every tensor read."""

    def __init__(self, real, reads):
        self.real, self.reads = real, reads

    def __call__(self, *args, **kwargs):
        handle = self.real(*args, **kwargs)
        reads = self.reads

        class Handle:
            def __enter__(self):
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name):
                reads.append(name)
                return self.inner.get_tensor(name)

            def get_slice(self, name):
                return self.inner.get_slice(name)

            def keys(self):
                return self.inner.keys()

        return Handle()


def test_loading_one_expert_reads_only_its_tensors(tiny_checkpoint, monkeypatch):
    cfg = MixtralConfig.from_json(tiny_checkpoint)
    reads: list[str] = []
    monkeypatch.setattr(ckpt, "safe_open", _SpyOpen(ckpt.safe_open, reads))
    names = expert_names(cfg, [3])
    shapes = tensor_shapes(cfg)
    got = load_tensors(tiny_checkpoint, {n: shapes[n] for n in names}, torch.float32)
    assert sorted(reads) == sorted(names) and set(got) == set(names)
    for n in names:
        assert torch.equal(got[n], random_tensor(n, shapes[n], 0, torch.float32))
    reads.clear()
    frontend = load_tensors(tiny_checkpoint, {n: shapes[n] for n in non_expert_names(cfg)},
                            torch.float32)
    assert not any(".experts." in n for n in reads) and set(frontend) == set(reads)


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def _shard_of(path, name):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][name]


def test_missing_tensor_is_named(broken):
    name = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    shard = _shard_of(broken, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Engine.from_pretrained(broken)


def test_wrong_shape_is_named(broken):
    name = "model.layers.0.self_attn.k_proj.weight"
    shard = _shard_of(broken, name)
    tensors = load_file(shard)
    tensors[name] = torch.zeros(3, 5)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"k_proj.*\(3, 5\)"):
        Engine.from_pretrained(broken)


def test_missing_shard_is_reported(broken):
    shard = _shard_of(broken, "lm_head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Engine.from_pretrained(broken)


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.pop("num_local_experts"), "num_local_experts"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: c.update(hidden_size="big"), "hidden_size"),
    (lambda c: c.update(sliding_window=-4), "sliding_window"),
    (lambda c: c.update(num_experts_per_tok=9), "num_experts_per_tok"),
])
def test_bad_config_names_the_field(broken, edit, field):
    raw = json.loads((broken / "config.json").read_text())
    edit(raw)
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=field):
        Engine.from_pretrained(broken)


def test_config_accepts_both_rope_spellings_and_null_fields():
    base = PRESETS["tiny"].to_hf_dict()
    top = MixtralConfig.from_dict(base | {"rope_theta": 5e5, "head_dim": None})
    nested = {k: v for k, v in base.items() if k != "rope_theta"}
    nested["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert MixtralConfig.from_dict(nested) == top
    assert top.head_dim == 16 and top.sliding_window is None
    assert MixtralConfig.from_dict(base | {"sliding_window": 4096}).sliding_window == 4096


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_dtype_auto_computes_half_in_float32_on_a_cpu_without_native_kernels(caplog, stored):
    """A bf16 (fp16) checkpoint keeps its dtype where the CPU has native kernels for it, and
    is computed in float32 where it has none (bf16 fell back to plain F.linear there: 0.36-0.54
    of vLLM-CPU's decode on a Zen 3); logged once, naming the reason; never on CUDA."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    flag = "bf16_native" if stored == torch.bfloat16 else "fp16_native"
    assert linear.native_dtype(stored, cpu, **{flag: True}) == stored
    linear._LOGGED_NATIVE.clear()
    with caplog.at_level(logging.INFO, logger="model.linear"):
        assert linear.native_dtype(stored, cpu, **{flag: False}) == torch.float32
        assert linear.native_dtype(stored, cpu, **{flag: False}) == torch.float32
    lines = [r.getMessage() for r in caplog.records if "no native" in r.getMessage()]
    assert len(lines) == 1 and "float32" in lines[0], lines
    assert linear.native_dtype(stored, cuda, **{flag: False}) == stored
    assert linear.native_dtype(torch.float32, cpu, bf16_native=False) == torch.float32


def test_dtype_auto_takes_the_checkpoints_torch_dtype(tmp_path, tiny_checkpoint, hf_checkpoint):
    """"auto" (the default) is config.json's `torch_dtype` (or transformers 5's `dtype`), as HF
    and vLLM take it; float32 for random weights or when none is named; an explicit dtype wins."""
    bf16 = write_random(PRESETS["tiny"], tmp_path / "bf16", torch.bfloat16, seed=0)
    assert Engine.from_pretrained(bf16).dtype == linear.native_dtype(torch.bfloat16,
                                                                   torch.device("cpu"))
    assert Engine.from_pretrained(bf16, dtype="float32").dtype == torch.float32
    assert ckpt.WeightSource(path=str(tiny_checkpoint)).resolve_dtype("auto") == torch.float32
    assert ckpt.WeightSource(path=str(hf_checkpoint()[1])).resolve_dtype("auto") == torch.float32
    assert ckpt.WeightSource(config=PRESETS["tiny"]).resolve_dtype("auto") == torch.float32
    raw = json.loads((bf16 / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        raw.pop("torch_dtype", None)
        (bf16 / "config.json").write_text(json.dumps(raw | {key: "float16"}))
        assert ckpt.WeightSource(path=str(bf16)).stored_dtype() == torch.float16
        assert ckpt.WeightSource(path=str(bf16)).resolve_dtype("auto", "cuda") == torch.float16
    (bf16 / "config.json").write_text(json.dumps(raw | {"dtype": "int8"}))
    with pytest.raises(ValueError, match=r"dtype 'auto'.*'int8'"):
        ckpt.WeightSource(path=str(bf16)).resolve_dtype("auto")
    with pytest.raises(ValueError, match=r"dtype must be 'auto' or one of"):
        ckpt.WeightSource(path=str(bf16)).resolve_dtype("fp8")
