"""The Ray pieces: the expert data plane (actors/experts), the front door on Serve
(actors/serving), and what both use: the frontend, RayEngine, options, failover, info.

`from actors import RayEngine` imports the engine on first use only (PEP 562), so a process
that imports one submodule, e.g. an expert actor's (actors/experts/worker.py), does not load
the engine, Serve and FastAPI along with it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.engine import RayEngine

__all__ = ["RayEngine"]


def __getattr__(name: str):
    if name == "RayEngine":
        from actors.engine import RayEngine
        return RayEngine
    raise AttributeError(f"module 'actors' has no attribute {name!r}")
