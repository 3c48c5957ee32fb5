"""The pure placement planner: spread, replicas on distinct nodes, clear failures."""
from __future__ import annotations

import collections

import pytest

from cluster.plan import Node, PlacementError, plan

HEAD = Node("head", {"CPU": 2, "frontend": 1})


def expert_nodes(n, slots=4):
    return [Node(f"n{i}", {"CPU": 2, "expert": slots}) for i in range(n)]


def test_eight_experts_spread_evenly_over_three_nodes():
    p = plan([HEAD] + expert_nodes(3), 8, 1, {"CPU": 0.1, "expert": 1},
             {"CPU": 0.1, "frontend": 1})
    assert p.frontend.node_id == "head"
    assert [p.experts[e][0].node_id for e in range(8)] == ["n0", "n1", "n2"] * 2 + ["n0", "n1"]
    per_node = collections.Counter(s.node_id for e in p.experts.values() for s in e)
    assert sorted(per_node.values()) == [2, 3, 3]


def test_replicas_of_one_expert_land_on_different_nodes():
    p = plan([HEAD] + expert_nodes(3, slots=6), 8, 2, {"expert": 1}, {"frontend": 1})
    for e, slots in p.experts.items():
        assert len(slots) == 2 and slots[0].node_id != slots[1].node_id, e
    assert len(p.slots()) == 17 and p.slots()[0] == p.frontend


def test_more_replicas_than_nodes_still_places_when_capacity_allows():
    p = plan([HEAD] + expert_nodes(1, slots=16), 8, 2, {"expert": 1}, {"frontend": 1})
    assert all(len(s) == 2 for s in p.experts.values())


def test_fractional_gpus_share_one_card():
    node = Node("gpu0", {"CPU": 16, "GPU": 1})
    p = plan([node], 8, 1, {"GPU": 0.1}, {"GPU": 0.2})
    assert {s.node_id for e in p.experts.values() for s in e} == {"gpu0"}


def test_not_enough_capacity_fails_with_what_was_needed_and_what_is_there():
    with pytest.raises(PlacementError) as err:
        plan([HEAD] + expert_nodes(2, slots=4), 8, 2, {"expert": 1}, {"frontend": 1})
    msg = str(err.value)
    assert "8 experts x 2 replica(s)" in msg and "{expert: 1}" in msg
    assert "node n0: {CPU: 2, expert: 4}" in msg


def test_no_gpu_anywhere():
    with pytest.raises(PlacementError, match=r"no node can hold the frontend \(\{GPU: 1\}\)"):
        plan(expert_nodes(2), 8)


def test_bad_replicas():
    with pytest.raises(PlacementError, match="expert_replicas must be >= 1"):
        plan(expert_nodes(2), 8, 0, {"expert": 1}, {"CPU": 1})
