"""Shared fixtures: random checkpoints written by transformers (the oracle) and by us."""
from __future__ import annotations

import logging

import pytest
import torch

torch.set_num_threads(2)
logging.getLogger("model").setLevel(logging.WARNING)

TINY_HF = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
               num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=None)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Write a random transformers MixtralForCausalLM (sharded) and return (model, path).

    Cached per config for the session: call with overrides of TINY_HF."""
    transformers = pytest.importorskip("transformers")
    cache = {}

    def make(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            torch.manual_seed(len(cache) + 1)
            cfg = transformers.MixtralConfig(**(TINY_HF | overrides))
            model = transformers.MixtralForCausalLM(cfg).eval()
            path = tmp_path_factory.mktemp("hf")
            model.save_pretrained(path, max_shard_size="4MB")
            cache[key] = (model, path)
        return cache[key]

    return make


def _random_checkpoint(tmp_path_factory, preset: str):
    from model.checkpoint import write_random
    from model.config import PRESETS
    return write_random(PRESETS[preset], tmp_path_factory.mktemp(preset), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Our own `tiny` random checkpoint, with tokenizer files."""
    return _random_checkpoint(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """The `small` preset (hidden 512, 8 layers; 0.86 GB in fp32)."""
    return _random_checkpoint(tmp_path_factory, "small")


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from model.engine import Engine
    return Engine.from_pretrained(tiny_checkpoint, max_num_batched_tokens=64)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster: a head offering `frontend` and 3 nodes offering 6 `expert`
    slots each; shared by the integration and e2e tests."""
    from cluster.local import local_cluster
    with local_cluster(expert_nodes=3, expert_slots=6) as cluster:
        yield cluster
