"""A Ray cluster of several simulated nodes on this machine, for tests and development.

    with local_cluster(expert_nodes=3, expert_slots=4) as cluster:
        engine = RayEngine.from_pretrained(path, expert_resources=EXPERT_SLOT,
                                           frontend_resources=FRONTEND_SLOT)

The head node offers `frontend: 1`; each expert node offers `expert: expert_slots`, so the
planner puts the frontend on the head and spreads the experts over the expert nodes. Every
node is a real raylet with its own worker processes (`ray.cluster_utils.Cluster`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Iterator

import ray
from ray.cluster_utils import Cluster

log = logging.getLogger(__name__)

FRONTEND_RESOURCE = "frontend"
EXPERT_RESOURCE = "expert"
# on the head only, plenty of it: pins a Serve replica next to the HeadOnly proxy, which routes
# only to replicas on its own node while there are any (Serve's prefer-local-node routing)
HEAD_RESOURCE = "head"
# per-actor resources that put the frontend on the head and experts on the expert nodes
FRONTEND_SLOT = {"CPU": 0.01, FRONTEND_RESOURCE: 1}
EXPERT_SLOT = {"CPU": 0.01, EXPERT_RESOURCE: 1}


def free_port() -> int:
    """A TCP port free on this machine now (for a test's or benchmark's proxies)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster(expert_nodes: int = 3, expert_slots: int = 4, cpus_per_node: int = 2,
                  object_store_memory: int = 200 * 2**20) -> Iterator[Cluster]:
    """Start a head plus `expert_nodes` nodes, connect this process to it, tear it down after."""
    os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir())
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "resources": {FRONTEND_RESOURCE: 1, HEAD_RESOURCE: 1000},
        "object_store_memory": object_store_memory,
        # metrics reach each node's exporter within 1 s (Ray's default is 10 s)
        "_system_config": {"metrics_report_interval_ms": 1000}})
    try:
        for _ in range(expert_nodes):
            cluster.add_node(num_cpus=cpus_per_node, resources={EXPERT_RESOURCE: expert_slots},
                             object_store_memory=object_store_memory)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        log.info("local cluster: head + %d expert nodes at %s", expert_nodes, cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
