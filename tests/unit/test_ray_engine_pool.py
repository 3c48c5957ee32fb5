"""RayEngine on a shared expert pool, without Ray: the expert fields an engine sets that the
pool's options override are named in one WARNING (actors/engine.py: _ignored_fields, _on_pool).
The pool on a real cluster: tests/integration/test_shared_pool.py."""
from __future__ import annotations

import logging
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import actors.engine as engine_module
from actors.engine import POOL_FIELDS, RayEngine, _ignored_fields
from actors.options import EngineOptions
from model.checkpoint import WeightSource

# values each expert field may take (the default first), all valid for 8 experts
VALUES = {"expert_replicas": [1, 2, 3], "experts_per_actor": [1, 2, 4],
          "expert_resources": [None, {"CPU": 1}, {"GPU": 1}], "expert_threads": [None, 1, 2],
          "expert_autoscaling": [None, {"max_replicas": 2, "target_rows_per_s": 100.0}]}
CHOICES = st.fixed_dictionaries({f: st.integers(0, len(v) - 1) for f, v in VALUES.items()})


def options(choice: dict[str, int], **fields) -> EngineOptions:
    return EngineOptions(**{f: VALUES[f][i] for f, i in choice.items()}, **fields)


def test_the_values_cover_every_pool_field_and_start_with_its_default():
    default = EngineOptions()
    assert set(VALUES) == set(POOL_FIELDS)
    assert all(VALUES[f][0] == getattr(default, f) for f in POOL_FIELDS)


@settings(max_examples=200, deadline=None)
@given(CHOICES, CHOICES)
def test_ignored_fields_are_those_set_here_to_other_values_than_the_pools(mine, pools):
    ignored = _ignored_fields(options(mine), options(pools))
    assert ignored == [f for f in POOL_FIELDS if mine[f] != 0 and mine[f] != pools[f]]


def on_pool(caplog, mine: EngineOptions, pools: EngineOptions) -> list[str]:
    """RayEngine._on_pool's WARNING lines up to the frontend's start (which is stubbed)."""
    pool = types.SimpleNamespace(source=WeightSource(), options=pools, name="mixtral-ep-pool:t")

    def no_frontend(*args):
        raise RuntimeError("no frontend without Ray")

    with caplog.at_level(logging.WARNING, logger="actors.engine"), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "_frontend_actor", no_frontend)
        with pytest.raises(RuntimeError, match="no frontend"):
            RayEngine._on_pool(WeightSource(), mine, pool, tokenizer=None)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_engine_on_a_pool_warns_once_naming_the_fields_the_pool_overrides(caplog):
    pools = EngineOptions(dtype="float32", expert_replicas=2, experts_per_actor=1)
    mine = EngineOptions(dtype="float32", expert_replicas=3, experts_per_actor=2,
                         expert_threads=2)
    [line] = on_pool(caplog, mine, pools)
    assert "mixtral-ep-pool:t" in line
    assert ("ignoring this engine's expert_replicas=3, experts_per_actor=2, expert_threads=2 "
            "(the pool's: expert_replicas=2, experts_per_actor=1, expert_threads=None)") in line


def test_an_engine_on_a_pool_with_no_expert_fields_of_its_own_does_not_warn(caplog):
    pools = EngineOptions(dtype="float32", expert_replicas=2, experts_per_actor=2)
    assert on_pool(caplog, EngineOptions(dtype="float32"), pools) == []
    assert on_pool(caplog, EngineOptions(dtype="float32", expert_replicas=2), pools) == []
