"""From a Plan to reserved resources: one placement group whose bundle i is pinned (by the
`ray.io/node-id` label) to the node the plan chose for slot i, and the actor options that
schedule an actor into its bundle. Reservation is all-or-nothing and bounded in time: a
cluster that cannot hold the plan fails with PlacementError instead of hanging.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Mapping

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.plan import Node, PlacementError, Plan, Slot, describe

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
    return resource.startswith("node:") or resource in _IGNORED or _PG_RESOURCE.search(resource) is not None


def reserve(plan: Plan, timeout_s: float = 60.0) -> PlacementGroup:
    """Create the plan's placement group and wait for it; PlacementError after timeout_s."""
    slots = plan.slots()
    pg = placement_group([dict(s.resources) for s in slots], strategy="PACK",
                         bundle_label_selector=[{NODE_ID_LABEL: s.node_id} for s in slots])
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(f"the placement group for {len(slots)} actors was not ready after "
                             f"{timeout_s:g} s (resources taken meanwhile?); "
                             f"{describe(cluster_nodes())}")
    log.info("reserved %d bundles on %d node(s)", len(slots), len({s.node_id for s in slots}))
    return pg


def resource_options(resources: Mapping[str, float]) -> dict:
    """Ray's actor options for a resource dict: {"CPU": 1, "GPU": 1, "frontend": 1} ->
    {"num_cpus": 1, "num_gpus": 1, "resources": {"frontend": 1}} (also a Serve deployment's
    `ray_actor_options`)."""
    res = dict(resources)
    return {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0), "resources": res}


def actor_options(pg: PlacementGroup, bundle: int, slot: Slot) -> dict:
    """`.options(...)` that put an actor into bundle `bundle` with the slot's resources."""
    return {**resource_options(slot.resources), "scheduling_strategy":
            PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)}


def release(pg: PlacementGroup, timeout_s: float = 30.0) -> None:
    """Remove the placement group and wait until every node reports its resources free again,
    so that the next plan sees them."""
    remove_placement_group(pg)
    pg_id = pg.id.hex()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free = ray._private.state.available_resources_per_node()
        if not any(pg_id in name for res in free.values() for name in res):
            return
        time.sleep(0.1)
    log.warning("placement group %s still holds resources after %g s", pg_id, timeout_s)
