"""The engine deployment: one expert-parallel engine (RayEngine: its frontend actor and expert
actors) per replica, reached from the gateway through a streaming DeploymentHandle. Token ids
and SamplingParams in, StreamChunks out; the client going away cancels the stream, which aborts
the request and frees its KV blocks.
"""
from __future__ import annotations

from ray import serve

from actors.engine import RayEngine
from model.checkpoint import WeightSource
from model.engine import SamplingParams


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.01})
class EngineServer:
    """Forwards to its RayEngine; the work happens in the frontend and expert actors."""

    def __init__(self, source: WeightSource, engine_options: dict):
        self.source = source
        self.engine = RayEngine.from_source(source, **engine_options)

    async def stream(self, prompt_ids: list[int], params: SamplingParams):
        async for chunk in self.engine.stream(prompt_ids, params):
            yield chunk

    def info(self) -> dict:
        cfg = self.source.model_config()
        placement = self.engine.placement()
        front = self.engine.frontend_info()
        return {"context_length": front["max_model_len"], "vocab_size": cfg.vocab_size,
                "num_layers": cfg.num_hidden_layers, "num_experts": cfg.num_local_experts,
                "experts_per_token": cfg.num_experts_per_tok,
                "frontend_node_id": placement["frontend"], "experts": placement["experts"],
                "free_blocks": front["free_blocks"], "total_blocks": front["total_blocks"]}

    def __del__(self):
        if hasattr(self, "engine"):       # not if start-up failed
            self.engine.shutdown()
