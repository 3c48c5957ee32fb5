"""ExpertPool on the shared local cluster: the served path's shape (no frontend bundle: the
engine replica is the frontend), and a shutdown that leaves nothing behind."""
from __future__ import annotations

import time

import pytest
import ray

from actors.experts.pool import ExpertPool
from cluster.local import EXPERT_RESOURCE, EXPERT_SLOT, FRONTEND_RESOURCE
from model.checkpoint import WeightSource


def free(resource: str) -> float:
    return sum(res.get(resource, 0.0)
               for res in ray._private.state.available_resources_per_node().values())


def all_free() -> tuple[float, float]:
    """Wait until actors killed by earlier tests have given their slots back (Ray frees them
    asynchronously), then return the free (expert, frontend) slots: the whole cluster's."""
    total = ray.cluster_resources()
    deadline = time.monotonic() + 60
    while (free(EXPERT_RESOURCE), free(FRONTEND_RESOURCE)) != (total[EXPERT_RESOURCE],
                                                               total[FRONTEND_RESOURCE]):
        assert time.monotonic() < deadline, "earlier tests' actors never gave their slots back"
        time.sleep(0.5)
    return free(EXPERT_RESOURCE), free(FRONTEND_RESOURCE)


def test_a_pool_without_a_frontend_reserves_the_experts_only_and_frees_them(ray_cluster,
                                                                            tiny_checkpoint):
    before = all_free()
    pool = ExpertPool.start(WeightSource(path=str(tiny_checkpoint)),
                            expert_resources=EXPERT_SLOT, experts_per_actor=2, expert_threads=1)
    try:
        pool.ready()
        assert pool.experts.actor_experts == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert len(pool.experts.secret) == 64
        assert (free(EXPERT_RESOURCE), free(FRONTEND_RESOURCE)) == (before[0] - 4, before[1])
        with pytest.raises(ValueError, match="no frontend bundle"):
            pool.frontend_options()
        workers = ray.get([a.info.remote() for a in pool.experts.actors])
        assert [list(w.expert_ids) for w in workers] == pool.experts.actor_experts
        first = pool.experts.actors[0]
    finally:
        pool.shutdown()
    pool.shutdown()                                           # idempotent
    assert (free(EXPERT_RESOURCE), free(FRONTEND_RESOURCE)) == before
    assert pool.experts.actors == []
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(first.info.remote(), timeout=30)
