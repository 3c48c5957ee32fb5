"""From a Plan to reserved resources: one placement group per slot, its one bundle pinned (by
the `ray.io/node-id` label) to the node the plan chose, and the actor options that schedule an
actor into it; one group per actor, so that live scaling can give one actor's resources back.
Reservation is all-or-nothing and bounded in time: a cluster that cannot hold the plan fails
with PlacementError instead of hanging.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.plan import Node, PlacementError, Slot, describe

log = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"
_IGNORED = ("memory", "object_store_memory")
_PG_RESOURCE = re.compile(r"_group_(\d+_)?[0-9a-f]{20,}$")


def cluster_nodes() -> list[Node]:
    """Alive nodes with the resources still free on each (what a new plan may use)."""
    free = ray._private.state.available_resources_per_node()
    return [Node(node_id, {k: v for k, v in res.items() if not _internal(k)})
            for node_id, res in sorted(free.items())]


def _internal(resource: str) -> bool:
    """Node-id and memory entries, and the per-bundle resources placement groups add."""
    return (resource.startswith("node:") or resource in _IGNORED
            or _PG_RESOURCE.search(resource) is not None)


def reserve(slots: list[Slot], timeout_s: float = 60.0,
            names: list[str] | None = None) -> list[PlacementGroup]:
    """A placement group of one bundle per slot, pinned to the slot's node, so that each actor's
    resources can be given back on their own (live scaling). All or nothing: PlacementError,
    with nothing left reserved, if they are not all ready after timeout_s. `names` (one per
    slot): named, detached groups, which outlive the process that reserved them (a shared
    expert pool's, actors/experts/shared.py); None: unnamed groups owned by this process."""
    kept = [{"name": n, "lifetime": "detached"} for n in names] if names else [{}] * len(slots)
    pgs = [placement_group([dict(s.resources)], bundle_label_selector=[{NODE_ID_LABEL: s.node_id}],
                           **k) for s, k in zip(slots, kept)]
    ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=len(pgs), timeout=timeout_s)
    if len(ready) < len(pgs):
        release(pgs)
        raise PlacementError(f"the placement groups for {len(slots)} actors were not ready after "
                             f"{timeout_s:g} s (resources taken meanwhile?); "
                             f"{describe(cluster_nodes())}")
    log.info("reserved %d bundles on %d node(s)", len(slots), len({s.node_id for s in slots}))
    return pgs


def resource_options(resources: Mapping[str, float]) -> dict:
    """Ray's actor options for a resource dict: {"CPU": 1, "GPU": 1, "frontend": 1} ->
    {"num_cpus": 1, "num_gpus": 1, "resources": {"frontend": 1}} (also a Serve deployment's
    `ray_actor_options`)."""
    res = dict(resources)
    return {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0), "resources": res}


def actor_options(pg: PlacementGroup, slot: Slot) -> dict:
    """`.options(...)` that put an actor into `pg` (reserved for `slot`) with its resources."""
    return {**resource_options(slot.resources), "scheduling_strategy":
            PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)}


def release(pgs: list[PlacementGroup], timeout_s: float = 30.0) -> None:
    """Remove the placement groups and wait until every node reports their resources free
    again, so that the next plan sees them."""
    for pg in pgs:
        remove_placement_group(pg)
    ids = [pg.id.hex() for pg in pgs]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free = ray._private.state.available_resources_per_node()
        if not any(i in name for res in free.values() for name in res for i in ids):
            return
        time.sleep(0.1)
    log.warning("placement groups %s still hold resources after %g s", ids, timeout_s)
