"""RayEngine on the shared local cluster (tests/conftest.py: ray_cluster)."""
from __future__ import annotations

import pytest

from cluster.local import EXPERT_SLOT, FRONTEND_SLOT


@pytest.fixture(scope="session")
def ray_engine(ray_cluster):
    """RayEngine factory: frontend on the head, experts on the expert nodes."""
    from actors import RayEngine

    def make(path, replicas=1, **kwargs):
        return RayEngine.from_pretrained(path, expert_replicas=replicas, expert_resources=EXPERT_SLOT,
                                         frontend_resources=FRONTEND_SLOT, frontend_threads=1,
                                         expert_threads=1, **kwargs)
    return make
