"""A real local Ray cluster: a head (frontend resource) and 3 expert nodes, shared by the
integration tests, plus the in-process engines they must equal."""
from __future__ import annotations

import pytest

from cluster.local import EXPERT_RESOURCE, FRONTEND_RESOURCE, local_cluster

EXPERT = {"CPU": 0.01, EXPERT_RESOURCE: 1}
FRONTEND = {"CPU": 0.01, FRONTEND_RESOURCE: 1}


@pytest.fixture(scope="session")
def ray_cluster():
    with local_cluster(expert_nodes=3, expert_slots=6) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ray_engine(ray_cluster):
    """RayEngine factory: frontend on the head, experts on the expert nodes."""
    from actors import RayEngine

    def make(path, replicas=1, **kwargs):
        return RayEngine.from_pretrained(path, expert_replicas=replicas, expert_resources=EXPERT,
                                         frontend_resources=FRONTEND, threads=1, **kwargs)
    return make
