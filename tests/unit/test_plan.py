"""The pure placement planner: spread, replicas on distinct nodes, clear failures."""
from __future__ import annotations

import collections

import pytest

from cluster.plan import Node, PlacementError, expert_groups, plan

HEAD = Node("head", {"CPU": 2, "frontend": 1})


def expert_nodes(n, slots=4):
    return [Node(f"n{i}", {"CPU": 2, "expert": slots}) for i in range(n)]


def test_eight_experts_spread_evenly_over_three_nodes():
    p = plan([HEAD] + expert_nodes(3), 8, 1, {"CPU": 0.1, "expert": 1},
             {"CPU": 0.1, "frontend": 1})
    assert p.frontend.node_id == "head"
    assert [p.groups[(e,)][0].node_id for e in range(8)] == ["n0", "n1", "n2"] * 2 + ["n0", "n1"]
    per_node = collections.Counter(s.node_id for _, s in p.actors())
    assert sorted(per_node.values()) == [2, 3, 3]


def test_replicas_of_one_expert_land_on_different_nodes():
    p = plan([HEAD] + expert_nodes(3, slots=6), 8, 2, {"expert": 1}, {"frontend": 1})
    for ids, slots in p.groups.items():
        assert len(slots) == 2 and slots[0].node_id != slots[1].node_id, ids
    assert len(p.slots()) == 17 and p.slots()[0] == p.frontend
    assert p.shared == []                     # nothing to warn about


def test_replicas_that_must_share_a_node_say_why():
    p = plan([HEAD] + expert_nodes(2, slots=12), 8, 3, {"expert": 1}, {"frontend": 1})
    assert len(p.shared) == 8                 # the third replica of each expert: 2 nodes only
    assert "experts [0] replica 2 shares node" in p.shared[0]
    assert "no other node has room for {expert: 1} (3 node(s))" in p.shared[0]


def test_more_replicas_than_nodes_still_places_when_capacity_allows():
    p = plan([HEAD] + expert_nodes(1, slots=16), 8, 2, {"expert": 1}, {"frontend": 1})
    assert all(len(s) == 2 for s in p.groups.values())
    assert len(p.shared) == 8 and all("shares node n0" in why for why in p.shared)


def test_fractional_gpus_share_one_card():
    node = Node("gpu0", {"CPU": 16, "GPU": 1})
    p = plan([node], 8, 1, {"GPU": 0.1}, {"GPU": 0.2})
    assert {s.node_id for _, s in p.actors()} == {"gpu0"}


def test_not_enough_capacity_fails_with_what_was_needed_and_what_is_there():
    with pytest.raises(PlacementError) as err:
        plan([HEAD] + expert_nodes(2, slots=4), 8, 2, {"expert": 1}, {"frontend": 1})
    msg = str(err.value)
    assert "8 experts x 2 replica(s) in actors of 1" in msg and "{expert: 1}" in msg
    assert "node n0: {CPU: 2, expert: 4}" in msg


def test_no_gpu_anywhere():
    with pytest.raises(PlacementError, match=r"no node can hold the frontend \(\{GPU: 1\}\)"):
        plan(expert_nodes(2), 8, 1, {"GPU": 1}, {"GPU": 1})
    with pytest.raises(PlacementError, match=r"each needing \{GPU: 1\}: ran out"):
        plan(expert_nodes(2), 8)                 # experts ask for a GPU by default


def test_a_plan_without_a_frontend_reserves_only_the_experts():
    """The served path: the frontend is the Serve replica, already placed by Serve."""
    p = plan([HEAD] + expert_nodes(2, slots=4), 8, 1, {"expert": 1}, None)
    assert p.frontend is None and len(p.slots()) == 8 and p.slots() == [s for _, s in p.actors()]
    with pytest.raises(PlacementError) as err:
        plan([HEAD] + expert_nodes(1, slots=4), 8, 1, {"expert": 1}, None)
    assert "frontend" not in str(err.value).split(";")[0]


def test_bad_replicas():
    with pytest.raises(PlacementError, match="expert_replicas must be >= 1"):
        plan(expert_nodes(2), 8, 0, {"expert": 1}, {"CPU": 1})


def test_an_actor_of_k_experts_is_one_placement_unit():
    p = plan([HEAD] + expert_nodes(3, slots=3), 8, 2, {"expert": 1}, {"frontend": 1},
             experts_per_actor=2)
    assert sorted(p.groups) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [ids for ids, _ in p.actors()] == [(0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (4, 5),
                                               (6, 7), (6, 7)]
    for ids, slots in p.groups.items():           # replicas of one group on different nodes
        assert slots[0].node_id != slots[1].node_id, ids
    per_node = collections.Counter(s.node_id for _, s in p.actors())
    assert sorted(per_node.values()) == [2, 3, 3] and len(p.slots()) == 9



def test_a_replica_avoids_its_groups_node_even_when_that_node_has_the_most_room():
    nodes = [HEAD, Node("big", {"expert": 10}), Node("small", {"expert": 2})]
    p = plan(nodes, 8, 2, {"expert": 1}, {"frontend": 1}, experts_per_actor=2)
    assert ([{s.node_id for s in p.groups[ids]} for ids in [(0, 1), (2, 3)]]
            == [{"big", "small"}] * 2)
    assert {s.node_id for s in p.groups[(4, 5)]} == {"big"}        # small is full: same node


def test_k_experts_per_actor_need_8_over_k_slots():
    with pytest.raises(PlacementError,
                       match=r"in actors of 4, .* ran out at experts \[4, 5, 6, 7\]"):
        plan([HEAD] + expert_nodes(1, slots=1), 8, 1, {"expert": 1}, {"frontend": 1},
             experts_per_actor=4)


@pytest.mark.parametrize("k", [0, 3, 5, 16])
def test_experts_per_actor_must_divide_the_experts(k):
    with pytest.raises(PlacementError, match=rf"experts_per_actor must .* divide num_local_experts "
                                             rf"\(8\), got {k}"):
        plan([HEAD] + expert_nodes(3), 8, 1, {"expert": 1}, {"frontend": 1}, experts_per_actor=k)


def test_expert_groups():
    assert expert_groups(8, 1) == [(e,) for e in range(8)]
    assert expert_groups(8, 8) == [tuple(range(8))]
    assert expert_groups(6, 3) == [(0, 1, 2), (3, 4, 5)]
