"""The expert replica counts last set by hand on a served application, kept where an engine
replica's death does not reach, so the replica Serve starts in its place scales back to them.

    counts = ExpertCounts.of_this_replica()     # in an EngineServer replica
    counts.restore(fleet)                       # at start: the counts last set, if any (logged)
    counts.set(fleet, {0: 2})                   # scale live, then remember the result

Where: Ray's GCS key-value store (`ray.experimental.internal_kv`, where Serve keeps its own
checkpoints; not public API: Ray is pinned), one key per application, holding every expert id's
replicas after the last successful `set` and the deploy they were set in: the deployment's code
version (a new random one per `serve.run`; a hash of the import path for a config's deploy) and
the application's `last_deployed_time_s` (new per config deploy, and per application created).
A replica restores them only in that same deploy: a replica Serve restarts does; a redeploy (new
args, `serve deploy`, a `serve run` again, a delete and a new one) starts from its options'.
The record is the application's, not one replica's: with several engine replicas, each replica
that starts takes the counts last set on any of them. A `set` that fails changes nothing here;
a record that cannot be written or restored is logged (WARNING) and the replica serves with what
it has. The autoscaler's changes are not recorded: with `expert_autoscaling` on, the policy owns
the counts and sets them again from the load.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING

from ray import serve
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

if TYPE_CHECKING:
    from actors.experts.fleet import ExpertFleet

# a child of Serve's logger: its handlers and LoggingConfig apply in a replica
log = logging.getLogger(f"ray.serve.{__name__}")

NAMESPACE = "mixtral_ep"        # of the GCS key-value store


class ExpertCounts:
    def __init__(self, app: str, version: str | None):
        """`app`: the Serve application's name (the record's key); `version`: the replica's
        code version (its ReplicaContext's)."""
        self.app, self.version = app, version
        self.key = f"expert_replicas/{app}"
        self._lock = threading.Lock()       # a `set` and its record, in the order they happen

    @classmethod
    def of_this_replica(cls) -> ExpertCounts:
        """The record of the application this Serve replica belongs to."""
        context = serve.get_replica_context()
        return cls(context.app_name, context.code_version)

    def deployed(self) -> float:
        """The application's last deploy time now (Unix seconds; Serve's status)."""
        return serve.status().applications[self.app].last_deployed_time_s

    def deploy(self) -> list:
        """Which deploy this replica serves: [code version, last deploy time]."""
        return [self.version, self.deployed()]

    def save(self, replicas: dict[int, int]) -> None:
        """Record `replicas` (expert id -> replicas) as the application's counts."""
        record = {"deploy": self.deploy(), "replicas": replicas}
        _internal_kv_put(self.key, json.dumps(record), namespace=NAMESPACE)

    def load(self) -> dict[int, int] | None:
        """The counts recorded during the application's current deploy, else None."""
        raw = _internal_kv_get(self.key, namespace=NAMESPACE)
        if raw is None:
            return None
        record = json.loads(raw)
        if record["deploy"] != self.deploy():              # set before a redeploy
            return None
        return {int(e): n for e, n in record["replicas"].items()}

    def set(self, fleet: ExpertFleet, replicas: dict[int, int]) -> dict[int, int]:
        """fleet.set_expert_replicas(replicas), then its result recorded; -> replicas per
        expert id. Its errors change nothing (ValueError, PlacementError); a record that cannot
        be written is logged and the scaling stands."""
        with self._lock:
            now = fleet.set_expert_replicas(replicas)
            try:
                self.save(now)
            except Exception:                   # the scaling itself succeeded: it stands
                log.warning("expert replicas %s are set but not recorded: a restarted engine "
                            "replica will not restore them", now, exc_info=True)
            return now

    def restore(self, fleet: ExpertFleet) -> None:
        """Scale `fleet` to the counts last set on this application, if any (logged at INFO);
        one that cannot be read or placed is logged (WARNING) and the fleet stays as started."""
        try:
            replicas = self.load()
            if replicas is None:
                return
            log.info("restoring the expert replicas last set on application %r: %s",
                     self.app, replicas)
            fleet.set_expert_replicas(replicas)
        except Exception:                       # serve with the options' counts instead
            log.warning("could not restore the expert replicas last set on application %r; "
                        "serving with the options' counts", self.app, exc_info=True)
