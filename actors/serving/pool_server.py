"""The shared expert pool's owner as a Serve deployment of the application (`expert_pool:
shared`, actors/options.py): one replica, a PoolOwner (actors/experts/shared.py), which every
engine replica reaches through a DeploymentHandle.

    build_app: pool = ExpertPoolServer.bind(source, options)
               EngineServer.bind(source, options, model_id, api_key, pool)

Serve restarts it when it dies (its health check); the new replica adopts the running expert
actors (detached, named `mixtral-ep-pool:{app}/...` in Serve's namespace), so no expert
reloads and no request is lost. Deleting the application stops it, and its `__del__` stops the
actors and removes their placement groups.
"""
from __future__ import annotations

import logging

from ray import serve
from ray.serve.schema import LoggingConfig

from actors.experts.shared import PoolOwner
from actors.options import EngineOptions
from model.checkpoint import WeightSource

log = logging.getLogger(f"ray.serve.{__name__}")


def pool_name(app: str) -> str:
    """The name of application `app`'s pool: its actors' and placement groups' prefix."""
    return f"mixtral-ep-pool:{app}"


# a frontend's long poll is an ongoing request: room for many; no access line per poll
@serve.deployment(num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0.01},
                  logging_config=LoggingConfig(enable_access_log=False))
class ExpertPoolServer(PoolOwner):
    def __init__(self, source: WeightSource, options: EngineOptions):
        super().__init__(source, options, pool_name(serve.get_replica_context().app_name))

    def __del__(self):
        if hasattr(self, "fleet"):          # not if start-up failed
            self.close()
