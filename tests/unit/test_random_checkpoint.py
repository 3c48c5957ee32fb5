"""Random checkpoints: the Hugging Face layout, loadable by transformers and by us, readable by
other users, and the CLI that writes them (python -m model.random_checkpoint)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model.checkpoint import random_tensor
from model.config import PRESETS
from model.engine import Engine
from model.linear import dense
from model.mixtral import tensor_shapes
from model.random_checkpoint import main, write_random


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.random_checkpoint", *args],
                          capture_output=True, text=True, timeout=300)


def test_random_checkpoint_has_hf_layout(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(tensor_shapes(PRESETS["tiny"]))
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (tiny_checkpoint / name).exists(), name
    tokenizer_config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert "[INST]" in tokenizer_config["chat_template"]


def test_transformers_loads_random_checkpoint_and_agrees(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(tiny_checkpoint,
                                                         dtype=torch.float32).eval()
    engine = Engine.from_pretrained(tiny_checkpoint)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (engine.logits(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_shards_are_as_readable_as_config_json(tmp_path):
    """Other nodes' users read them on a shared filesystem (safetensors creates files 0600)."""
    out = write_random(PRESETS["tiny"], tmp_path / "ckpt")
    mode = (out / "config.json").stat().st_mode & 0o777
    shards = sorted(out.glob("*.safetensors"))
    assert shards and all(s.stat().st_mode & 0o777 == mode for s in shards)


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "cli"
    proc = _cli("--preset", "tiny", "--out", str(out), "--dtype", "bfloat16", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "wrote tiny checkpoint" in proc.stderr
    engine = Engine.from_pretrained(out, dtype="float32")
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = random_tensor(name, (64, 64), 3, torch.bfloat16).float()
    qkv = dense(engine.model.get_buffer("model.layers.1.self_attn.qkv_proj.weight"))
    assert torch.equal(qkv[:64], expected)                       # q rows come first


def test_cli_help_explains_every_option():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())                        # unwrapped
    assert "Hugging Face Mixtral layout" in text
    options = text.split("options:", 1)[1]
    for option, words in {"--preset": "model shape", "--out": "output directory",
                          "--dtype": "torch_dtype", "--seed": "seed of every tensor",
                          "--shard-size-mb": "largest shard", "--hot-expert": "router"}.items():
        described = options.split(f"{option} ", 1)[1][:160]
        assert words in described, (option, described)


@pytest.mark.parametrize("args, named", [
    (["--shard-size-mb", "0"], "--shard-size-mb must be > 0, got 0"),
    (["--hot-expert", "8"], "hot_expert must be in [0, 8), got 8"),
])
def test_cli_names_a_bad_option_and_its_limit_and_writes_nothing(tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "tiny", "--out", str(tmp_path / "bad"), *args])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
