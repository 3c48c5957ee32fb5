"""The Ray pieces: expert actors, the dispatcher, the frontend actor and RayEngine."""
from actors.engine import RayEngine

__all__ = ["RayEngine"]
