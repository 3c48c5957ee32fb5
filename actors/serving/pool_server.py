"""The shared expert pool's owner as a Serve deployment of the application (`expert_pool:
shared`, actors/options.py): one replica, a PoolOwner (actors/experts/shared.py), which every
engine replica reaches through a DeploymentHandle.

    build_app: pool = ExpertPoolServer.bind(source, options)
               EngineServer.bind(source, options, model_id, api_key, pool)

Serve restarts it when it dies (its health check); the new replica adopts the running expert
actors (detached, named `pool_name(...)/expert/...` in Serve's namespace), so no expert
reloads and no request is lost. Deleting the application stops it, and its `__del__` stops the
actors and removes their placement groups. It exports the pool's metrics, once for every engine
replica (actors/serving/pool_metrics.py: PoolMetrics).
"""
from __future__ import annotations

import hashlib
import logging

from ray import serve
from ray.serve.schema import LoggingConfig

from actors.experts.detached import reap
from actors.experts.shared import PoolOwner
from actors.options import EngineOptions
from actors.serving import draining
from actors.serving.pool_metrics import PoolMetrics
from model.checkpoint import WeightSource

log = logging.getLogger(f"ray.serve.{__name__}")


def pool_prefix(app: str) -> str:
    """What the names of application `app`'s pools (its actors', placement groups') start with."""
    return f"mixtral-ep-pool:{app}:"


def pool_name(app: str, source: WeightSource, options: EngineOptions) -> str:
    """The pool of `app` deployed with these weights and options, which its engine replicas
    compute too (and check: PoolClient.ours): the replica Serve restarts adopts its actors; a
    deploy with other args makes another pool (the old one goes with its owner replica). A
    redeploy with the same args may adopt the running actors or start anew, whichever owner
    (old or new) acts first: both give a complete pool."""
    key = repr((source, options))
    return f"{pool_prefix(app)}{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# a frontend's long poll is an ongoing request: room for many; no access line per poll
# its shutdown waits for the engine replicas' drain (draining.GRACE_S) before it stops the actors
@serve.deployment(num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0.01},
                  graceful_shutdown_timeout_s=draining.GRACE_S + 30,
                  logging_config=LoggingConfig(enable_access_log=False))
class ExpertPoolServer(PoolOwner):
    def __init__(self, source: WeightSource, options: EngineOptions):
        context = serve.get_replica_context()
        name = pool_name(context.app_name, source, options)
        reap(pool_prefix(context.app_name), keep=name)      # the app's pools nobody owns
        super().__init__(source, options, name)
        # the pool's figures, exported here once for all engine replicas
        self.metrics = PoolMetrics(self.load, self._live_count, self.merge_stats)

    def check_health(self) -> None:
        """Serve's periodic liveness check: RuntimeError once the metrics thread died."""
        self.metrics.check()

    def __del__(self):
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "fleet"):          # not if start-up failed
            self.close(drain_s=draining.GRACE_S + 5)
