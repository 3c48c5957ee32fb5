"""Fixtures of the prefix-caching engine tests (tests/prefix.py)."""
from __future__ import annotations

import pytest

from model.engine import Engine
from tests.prefix import engine_factory


@pytest.fixture(scope="session")
def prefix_engine():
    """prefix_engine(blocks=1024, **engine_args) -> a fp32 `tiny` engine, KV blocks of
    tests.prefix.BS tokens, the same weights as every other engine this fixture makes."""
    return engine_factory()


@pytest.fixture(scope="session")
def uncached(prefix_engine) -> Engine:
    """The oracle of prefix caching: `prefix_engine`'s weights, every prompt computed from its first
    token."""
    return prefix_engine(enable_prefix_caching=False)
