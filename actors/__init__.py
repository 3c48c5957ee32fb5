"""The Ray pieces: expert actors and their pool, the dispatcher, the frontend (an actor of
RayEngine, or the engine replica itself when served) and RayEngine."""
from actors.engine import RayEngine

__all__ = ["RayEngine"]
