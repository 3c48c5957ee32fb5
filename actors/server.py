"""The engine deployment: one expert-parallel engine (RayEngine: its frontend actor and expert
actors) per replica, reached from the gateway through a streaming DeploymentHandle. Token ids
and SamplingParams in, StreamChunks out; the client going away cancels the stream, which aborts
the request and frees its KV blocks.
"""
from __future__ import annotations

from ray import serve

from actors.engine import RayEngine
from actors.info import EngineInfo
from model.checkpoint import WeightSource
from model.engine import SamplingParams


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.01})
class EngineServer:
    """Forwards to its RayEngine; the work happens in the frontend and expert actors."""

    def __init__(self, source: WeightSource, engine_options: dict):
        self.engine = RayEngine.from_source(source, **engine_options)

    async def stream(self, prompt_ids: list[int], params: SamplingParams):
        async for chunk in self.engine.stream(prompt_ids, params):
            yield chunk

    def info(self) -> EngineInfo:
        return self.engine.info()

    def __del__(self):
        if hasattr(self, "engine"):       # not if start-up failed
            self.engine.shutdown()
