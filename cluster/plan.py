"""Where every actor of one engine runs: a pure function of the cluster's nodes, no Ray.

    plan(nodes, num_experts=8, replicas=2, expert_resources={"GPU": 1},
         frontend_resources={"GPU": 1} or None, experts_per_actor=1) -> Plan

An expert actor holds a group of `experts_per_actor` consecutive expert ids (k = 2: groups
(0, 1), (2, 3), ...) and is one placement unit asking for `expert_resources`. The frontend, when
the plan has one, goes first, on the node with the most room for it; `frontend_resources=None`
plans none (the served path: the frontend is the Serve replica, placed by Serve, already
running, and what it holds is no longer free). Then, replica by replica and group by group, each
expert actor goes to the node with the most room left for `expert_resources` that does not yet
hold a replica of the same group (any node with room if every node already holds one, noted in
`Plan.shared`, which the pool logs as a warning): actors spread evenly, and replicas of one group
land on different nodes where the cluster allows, so losing one node loses at most one replica
of each expert.
A cluster that cannot hold the plan raises PlacementError saying what was needed and what
each node offers.

Example: 3 nodes with {"expert": 4} each, 8 experts, 1 replica -> experts 0..7 on nodes
a b c a b c a b (3, 3 and 2 per node); with experts_per_actor=2, groups (0, 1) .. (6, 7) on
a b c a.

    plan_added(nodes, {(0,): ["a"]}, {(0,): 2}, {"expert": 1}) -> {(0,): [Slot(b), Slot(c)]}

plans replicas added to a running engine (live scaling, actors/experts/scaling.py) the same way,
from the nodes' free resources and the nodes that already hold each group: all of them or none.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested actors; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Node:
    node_id: str
    resources: Mapping[str, float]          # what the node offers (free, for planning)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One actor: the node it runs on and the resources it reserves there."""
    node_id: str
    resources: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Plan:
    frontend: Slot | None                       # None: the frontend is placed elsewhere
    groups: dict[tuple[int, ...], list[Slot]]   # expert ids of one actor -> a slot per replica
    # groups whose replicas had to share a node, each with why (no other node had room)
    shared: list[str] = dataclasses.field(default_factory=list)

    def actors(self) -> list[tuple[tuple[int, ...], Slot]]:
        """(expert ids, slot) of every expert actor, by group then replica: bundle order."""
        return [(ids, s) for ids in sorted(self.groups) for s in self.groups[ids]]

    def slots(self) -> list[Slot]:
        """Every slot, the frontend's first (if planned), then the expert actors': bundle order."""
        front = [self.frontend] if self.frontend is not None else []
        return front + [s for _, s in self.actors()]


def expert_groups(num_experts: int, experts_per_actor: int) -> list[tuple[int, ...]]:
    """Consecutive expert ids per actor: (8, 2) -> [(0, 1), (2, 3), (4, 5), (6, 7)].
    PlacementError unless experts_per_actor >= 1 divides num_experts."""
    k = experts_per_actor
    if k < 1 or num_experts % k:
        raise PlacementError(f"experts_per_actor must be >= 1 and divide num_local_experts "
                             f"({num_experts}), got {k}")
    return [tuple(range(first, first + k)) for first in range(0, num_experts, k)]


def plan(nodes: list[Node], num_experts: int, replicas: int = 1,
         expert_resources: Mapping[str, float] | None = None,
         frontend_resources: Mapping[str, float] | None = None,
         experts_per_actor: int = 1) -> Plan:
    if replicas < 1:
        raise PlacementError(f"expert_replicas must be >= 1, got {replicas}")
    groups = expert_groups(num_experts, experts_per_actor)
    expert_resources = dict(expert_resources or {"GPU": 1})
    free = {n.node_id: dict(n.resources) for n in nodes}
    frontend = None
    if frontend_resources is not None:
        frontend_node = _roomiest(free, frontend_resources, exclude=set())
        if frontend_node is None:
            raise PlacementError(f"no node can hold the frontend ({_fmt(frontend_resources)}); "
                                 f"{describe(nodes)}")
        _take(free, frontend_node, frontend_resources)
        frontend = Slot(frontend_node, dict(frontend_resources))
    beside = f" (plus the frontend's {_fmt(frontend_resources)})" if frontend else ""
    placed: dict[tuple[int, ...], list[Slot]] = {ids: [] for ids in groups}
    shared = []
    for replica in range(replicas):
        for ids in groups:
            holders = {s.node_id for s in placed[ids]}
            node = _roomiest(free, expert_resources, exclude=holders)
            if node is None and (node := _roomiest(free, expert_resources, exclude=set())):
                shared.append(f"experts {list(ids)} replica {replica} shares node {node[:12]} "
                              f"with another replica: no other node has room for "
                              f"{_fmt(expert_resources)} ({len(free)} node(s))")
            if node is None:
                raise PlacementError(
                    f"cannot place {num_experts} experts x {replicas} replica(s) in actors of "
                    f"{experts_per_actor}, each needing {_fmt(expert_resources)}{beside}: ran "
                    f"out at experts {list(ids)}, replica {replica}; {describe(nodes)}")
            _take(free, node, expert_resources)
            placed[ids].append(Slot(node, expert_resources))
    return Plan(frontend, placed, shared)


def plan_added(nodes: list[Node], holders: Mapping[tuple[int, ...], list[str]],
               added: Mapping[tuple[int, ...], int],
               expert_resources: Mapping[str, float]) -> dict[tuple[int, ...], list[Slot]]:
    """Slots for `added[ids]` more actors of each group, given the node of each actor that
    already holds it (`holders[ids]`, may repeat): each on the node with the most room that
    holds no replica of the group yet, else any node with room. PlacementError naming what was
    asked and what each node offers if any one of them does not fit."""
    free = {n.node_id: dict(n.resources) for n in nodes}
    out: dict[tuple[int, ...], list[Slot]] = {}
    for ids, count in sorted(added.items()):
        taken = set(holders.get(ids, ()))
        for i in range(count):
            node = (_roomiest(free, expert_resources, exclude=taken)
                    or _roomiest(free, expert_resources, exclude=set()))
            if node is None:
                asked = ", ".join(f"experts {list(g)}: +{n}" for g, n in sorted(added.items()))
                raise PlacementError(
                    f"cannot add expert replicas ({asked}), each needing "
                    f"{_fmt(expert_resources)}: no room for replica {i + 1} of experts "
                    f"{list(ids)}; {describe(nodes)}")
            _take(free, node, expert_resources)
            taken.add(node)
            out.setdefault(ids, []).append(Slot(node, dict(expert_resources)))
    return out


def _fits(free: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items())


def _room(free: Mapping[str, float], need: Mapping[str, float]) -> float:
    """How many more such actors fit (fractional counts allowed)."""
    return min((free.get(k, 0.0) / v for k, v in need.items() if v > 0), default=float("inf"))


def _roomiest(free: dict[str, dict[str, float]], need: Mapping[str, float],
              exclude: set[str]) -> str | None:
    candidates = [n for n in free if n not in exclude and _fits(free[n], need)]
    # most room first; ties keep the nodes' given order (max returns the first maximum)
    return max(candidates, key=lambda n: _room(free[n], need), default=None)


def _take(free: dict[str, dict[str, float]], node: str, need: Mapping[str, float]) -> None:
    for k, v in need.items():
        free[node][k] = free[node].get(k, 0.0) - v


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def describe(nodes: list[Node]) -> str:
    if not nodes:
        return "the cluster has no alive nodes"
    shown = [(n.node_id[:12], {k: v for k, v in n.resources.items() if not k.startswith("node:")})
             for n in nodes]
    return "the cluster offers " + "; ".join(f"node {node}: {_fmt(res)}" for node, res in shown)
