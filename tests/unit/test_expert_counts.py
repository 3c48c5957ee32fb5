"""Expert replicas set by hand on a served application, kept outside the engine replica
(actors/serving/expert_counts.py), without Ray: the store is a dict and the deploy time a
variable. tests/e2e/test_failover.py kills a real replica and finds them restored."""
from __future__ import annotations

import logging

import pytest

from actors.serving import expert_counts
from actors.serving.expert_counts import ExpertCounts
from cluster.plan import PlacementError


class Fleet:
    """An ExpertFleet's set_expert_replicas over 8 expert ids, one replica each to start."""

    def __init__(self, fail: Exception | None = None):
        self.replicas = dict.fromkeys(range(8), 1)
        self.fail = fail

    def set_expert_replicas(self, replicas: dict[int, int]) -> dict[int, int]:
        if self.fail is not None:
            raise self.fail
        self.replicas.update(replicas)
        return dict(self.replicas)


@pytest.fixture
def store(monkeypatch) -> dict:
    """The GCS key-value store as a dict, and a deploy time of 100 (store["deployed"])."""
    kv: dict = {"deployed": 100.0}
    monkeypatch.setattr(expert_counts, "_internal_kv_put",
                        lambda key, value, namespace: kv.__setitem__((namespace, key), value))
    monkeypatch.setattr(expert_counts, "_internal_kv_get",
                        lambda key, namespace: kv.get((namespace, key)))
    monkeypatch.setattr(ExpertCounts, "deployed", lambda self: kv["deployed"])
    return kv


def test_a_new_replica_restores_the_counts_last_set(store, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve.actors.serving.expert_counts")
    assert ExpertCounts("app", "v1").set(Fleet(), {0: 2})[0] == 2
    restarted = Fleet()
    ExpertCounts("app", "v1").restore(restarted)
    assert restarted.replicas == {0: 2, **dict.fromkeys(range(1, 8), 1)}
    assert "restoring the expert replicas last set on application 'app'" in caplog.text


def test_a_redeploy_or_another_app_starts_from_its_options(store):
    """Another app; `serve.run` again (a new code version, the same deploy time); a config's
    deploy (the same code version, a new deploy time)."""
    ExpertCounts("app", "v1").set(Fleet(), {3: 3})
    other, run_again, deployed_again = Fleet(), Fleet(), Fleet()
    ExpertCounts("other", "v1").restore(other)
    ExpertCounts("app", "v2").restore(run_again)
    store["deployed"] = 200.0
    ExpertCounts("app", "v1").restore(deployed_again)
    for fleet in (other, run_again, deployed_again):
        assert fleet.replicas == dict.fromkeys(range(8), 1)


def test_a_failed_set_records_nothing(store):
    counts = ExpertCounts("app", "v1")
    counts.set(Fleet(), {1: 2})
    with pytest.raises(PlacementError):
        counts.set(Fleet(fail=PlacementError("no room")), {1: 4})
    assert counts.load() == {**dict.fromkeys(range(8), 1), 1: 2}


def test_counts_that_cannot_be_placed_leave_the_fleet_as_started(store, caplog):
    ExpertCounts("app", "v1").set(Fleet(), {0: 6})
    fleet = Fleet(fail=PlacementError("expert slots: need 5, have 2"))
    ExpertCounts("app", "v1").restore(fleet)                  # logged, not raised
    assert fleet.replicas == dict.fromkeys(range(8), 1)
    assert "could not restore the expert replicas" in caplog.text


def test_a_set_that_cannot_be_recorded_still_stands(store, monkeypatch, caplog):
    def unreachable(key, value, namespace):
        raise ConnectionError("GCS unreachable")
    monkeypatch.setattr(expert_counts, "_internal_kv_put", unreachable)
    fleet = Fleet()
    assert ExpertCounts("app", "v1").set(fleet, {2: 2})[2] == 2
    assert "are set but not recorded" in caplog.text
