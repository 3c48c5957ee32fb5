"""RayEngine on the shared local cluster (tests/conftest.py: ray_cluster), and one engine that
consecutive read-only tests share (tiny_ray_engine)."""
from __future__ import annotations

import pytest

from cluster.local import EXPERT_SLOT, FRONTEND_SLOT

_SHARED = pytest.StashKey()     # config.stash: the running tiny_ray_engine, or None


@pytest.fixture(scope="session")
def ray_engine(ray_cluster):
    """RayEngine factory: frontend on the head, experts on the expert nodes."""
    from actors import RayEngine

    def make(path, replicas=1, **kwargs):
        return RayEngine.from_pretrained(path, expert_replicas=replicas,
                                         expert_resources=EXPERT_SLOT,
                                         frontend_resources=FRONTEND_SLOT, frontend_threads=1,
                                         expert_threads=1, **kwargs)
    return make


@pytest.fixture
def tiny_ray_engine(request, ray_engine, tiny_checkpoint):
    """`ray_engine(tiny_checkpoint)`, shared by consecutive tests that only read and generate
    (they never kill, scale or shut it down): the first one starts it, and it is shut down after
    the last one (pytest_runtest_teardown below), before any test that needs the cluster's
    slots. tests/conftest.py runs its tests first in the lane, so it starts once."""
    if request.config.stash.get(_SHARED, None) is None:
        request.config.stash[_SHARED] = ray_engine(tiny_checkpoint)
    return request.config.stash[_SHARED]


@pytest.hookimpl(tryfirst=True)       # before pytest's own teardown, which may end the cluster
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Shut the shared engine down once the next test does not use it."""
    engine = item.config.stash.get(_SHARED, None)
    if engine is not None and (nextitem is None or "tiny_ray_engine" not in nextitem.fixturenames):
        item.config.stash[_SHARED] = None
        engine.shutdown()
