"""A shared expert pool's detached, named actors and placement groups, which outlive the
process of the pool's owner (actors/experts/shared.py): finding them again, and removing them.

    fleet = adopt_or_start(source, options, name, secret)    # a (restarted) owner's start
    remove_pool(name)             # kill `{name}/expert/...`, remove `{name}/...` groups, record
    reap(prefix, keep=name)       # remove the other pools named `prefix...` whose owner is dead
    record(name) / write_record(name, {...})    # the pool's record in Ray's GCS key-value store

Names: actor and group `{pool}/expert/{ids}/{uid}` in the owner's namespace (ExpertPool._name).
The record (`{"secret", "lease", "owner"}`: the channel secret, the lease of the owner that
last started or adopted the pool, its Ray actor id) is written before any actor starts, so
every pool's actors have one, and a pool whose recorded owner is dead can be found and removed
(`reap`: an application deleted while its pool's owner was dead leaves its actors until the
next deploy of that application removes them).
"""
from __future__ import annotations

import contextlib
import json
import logging

import ray
from ray._raylet import PlacementGroupID
from ray.experimental.internal_kv import (
    _internal_kv_del,
    _internal_kv_get,
    _internal_kv_list,
    _internal_kv_put,
)
from ray.util.placement_group import PlacementGroup

from actors.experts.fleet import ExpertFleet
from actors.experts.pool import ExpertPool, Member, default_resources
from actors.options import EngineOptions
from cluster.placement import release
from cluster.plan import Slot
from model.checkpoint import WeightSource

log = logging.getLogger(f"ray.serve.{__name__}")

KV_NAMESPACE = "mixtral_ep"     # of Ray's GCS key-value store (as actors/serving/expert_counts.py)


def record(name: str) -> dict | None:
    raw = _internal_kv_get(name, namespace=KV_NAMESPACE)
    return json.loads(raw) if raw is not None else None


def write_record(name: str, value: dict) -> None:
    _internal_kv_put(name, json.dumps(value), namespace=KV_NAMESPACE)


def _named_actors(prefix: str) -> list[str]:
    """Names of the live actors in this namespace that start with `prefix`."""
    namespace = ray.get_runtime_context().namespace
    return sorted(e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                  if e["namespace"] == namespace and e["name"].startswith(prefix))


def _named_groups(prefix: str) -> dict[str, list[PlacementGroup]]:
    """name -> the placement groups not removed whose name starts with `prefix`."""
    out: dict[str, list[PlacementGroup]] = {}
    for pg_id, entry in ray.util.placement_group_table().items():
        if entry.get("name", "").startswith(prefix) and entry.get("state") != "REMOVED":
            out.setdefault(entry["name"], []).append(
                PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    return out


def adopt_or_start(source: WeightSource, options: EngineOptions, name: str,
                   secret: str) -> ExpertFleet:
    """The fleet of pool `name`: its running actors (a restarted owner's) with their groups,
    groups whose actor is gone removed and a replica started for every expert group that no
    actor holds; or new actors when none run (ExpertFleet.start). Not waited for."""
    namespace = ray.get_runtime_context().namespace
    groups = _named_groups(f"{name}/expert/")
    members = []
    for actor in _named_actors(f"{name}/expert/"):
        pg = groups.pop(actor, [None])[0]
        if pg is None:                      # its group was being removed: not a member
            continue
        node = ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
        ids = tuple(int(e) for e in actor.split("/")[-2].split("-"))
        members.append(Member(ray.get_actor(actor, namespace=namespace), ids,
                              Slot(node, dict(pg.bundle_specs[0])), pg, actor))
    release([pg for pgs in groups.values() for pg in pgs])       # no actor in them
    if not members:
        return ExpertFleet.start(source, options, prefix=name, secret=secret)
    pool = ExpertPool(source, options.dtype, options.device, members, None,
                      options.expert_resources or default_resources(options.device),
                      options.expert_threads, options.placement_timeout_s,
                      options.max_num_batched_tokens, name, secret)
    pool.generation = pool.next_generation()
    k, experts = options.experts_per_actor, source.model_config().num_local_experts
    missing = {ids: 1 for ids in (tuple(range(i, i + k)) for i in range(0, experts, k))
               if ids not in pool.groups()}
    log.info("expert pool %s: adopted %d running actors%s", name, len(members),
             f", starting expert groups {sorted(missing)} that none holds" if missing else "")
    if missing:
        pool.commit(pool.grow(missing), [], pool.next_generation())
    return ExpertFleet(pool, options.autoscaling)


def remove_pool(name: str) -> None:
    """Kill every actor of pool `name` (no restart), remove its placement groups (waiting
    until their resources are free) and its record: for a pool whose owner is gone."""
    namespace = ray.get_runtime_context().namespace
    actors = _named_actors(f"{name}/")
    for actor in actors:
        with contextlib.suppress(ValueError):           # gone meanwhile
            ray.kill(ray.get_actor(actor, namespace=namespace), no_restart=True)
    release([pg for pgs in _named_groups(f"{name}/").values() for pg in pgs])
    _internal_kv_del(name, namespace=KV_NAMESPACE)
    log.info("expert pool %s removed (%d actors)", name, len(actors))


def actor_alive(actor_id: str) -> bool:
    """Whether Ray actor `actor_id` (hex) exists and is not dead (the GCS's actor table)."""
    entry = ray._private.state.actors(actor_id=actor_id)
    return bool(entry) and entry.get("State") != "DEAD"


def owner_alive(value: dict | None) -> bool:
    """Whether the owner a pool's record names is an actor that is not dead."""
    return bool(value and value.get("owner")) and actor_alive(value["owner"])


def reap(prefix: str, keep: str) -> None:
    """Remove every pool named `prefix...` other than `keep` whose owner is dead (an
    application deleted while its pool's owner was down, a start that was interrupted)."""
    for key in _internal_kv_list(prefix, namespace=KV_NAMESPACE):
        name = key.decode()
        if name != keep and not owner_alive(record(name)):
            log.warning("expert pool %s: its owner is gone; removing its actors", name)
            remove_pool(name)
