"""The house's layering, checked on the source (every import statement, at any depth):

    model/           plain single-process PyTorch: no Ray, gRPC, ZeroMQ, protobuf, other rooms
    actors/experts/  the expert data plane: never the front door (actors/serving), gRPC or FastAPI
    cluster/         where things run: never tensors (torch)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (room, module prefixes it must not import)
RULES = [
    ("model", ("ray", "grpc", "grpc_health", "zmq", "google.protobuf", "protos", "actors",
               "cluster", "deploy", "fastapi", "starlette")),
    ("actors/experts", ("actors.serving", "grpc", "grpc_health", "protos", "fastapi", "starlette",
                        "deploy")),
    ("cluster", ("torch", "actors", "deploy", "protos")),
]


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute module names imported anywhere in `path` (a module of `package`, dotted)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:                       # relative: from the file's own package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def violations(root: Path, room: str, forbidden: tuple[str, ...]) -> list[str]:
    """"file: module" for each import in `root/room` of a module under a forbidden prefix."""
    found = []
    for path in sorted((root / room).rglob("*.py")):
        package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
        for module in sorted(imported_modules(path, package)):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(root)}: {module}")
    return found


@pytest.mark.parametrize("room,forbidden", RULES, ids=[r for r, _ in RULES])
def test_each_room_imports_only_what_its_layer_allows(room, forbidden):
    assert (ROOT / room).is_dir()
    assert violations(ROOT, room, forbidden) == []


def test_the_check_sees_imports_at_any_depth_and_relative_ones(tmp_path):
    (tmp_path / "actors" / "experts").mkdir(parents=True)
    (tmp_path / "actors" / "experts" / "bad.py").write_text(
        "import os\n"
        "def f():\n"
        "    from ..serving import gateway\n"
        "    import grpc.aio\n")
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "plan.py").write_text("from torch import nn\nimport torchvision\n")
    experts = dict(RULES)["actors/experts"]
    assert violations(tmp_path, "actors/experts", experts) == [
        "actors/experts/bad.py: actors.serving", "actors/experts/bad.py: actors.serving.gateway",
        "actors/experts/bad.py: grpc.aio"]
    # a prefix matches whole module names only: torchvision is not torch
    assert violations(tmp_path, "cluster", dict(RULES)["cluster"]) == [
        "cluster/plan.py: torch", "cluster/plan.py: torch.nn"]


def test_an_expert_actors_process_loads_neither_serve_nor_fastapi():
    """Every expert actor imports actors/experts/worker.py in a new process: the package must
    not pull the engine, Serve and FastAPI in with it (~0.6 s of CPU per actor start)."""
    import subprocess
    import sys
    code = ("import sys, actors.experts.worker; "
            "print(sorted(m for m in ('ray.serve', 'fastapi', 'actors.engine', 'actors.serving') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
