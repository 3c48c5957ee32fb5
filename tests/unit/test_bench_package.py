"""bench/ is a package run as `python -m bench.X` from the repository root, never installed and
never editing sys.path; protos/ holds only the API (the .proto, its generated code, the client)."""
from __future__ import annotations

import fnmatch
import importlib
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:    # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
BENCHES = ("admission", "chaos", "choices", "dashboard", "dispatch", "elastic", "engine", "peer",
           "pool", "prefix", "sampler", "serve", "soak")
API = {"__init__.py", "client.py", "client_output.py", "client_structured.py", "generator.proto",
       "generator_pb2.py", "generator_pb2.pyi", "generator_pb2_grpc.py"}


@pytest.mark.parametrize("name", BENCHES)
def test_each_benchmark_starts_as_a_module(name, monkeypatch, capsys):
    """`python -m bench.X --help` parses before any work, so this runs no benchmark."""
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"python -m bench.{name}", "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_no_bench_file_edits_sys_path():
    for path in sorted((ROOT / "bench").glob("*.py")):
        assert "sys.path" not in path.read_text(), path.name


def test_the_load_generator_lives_in_bench():
    assert callable(importlib.import_module("bench.loadgen").make_jobs)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("protos.loadgen")


def test_protos_holds_only_the_api():
    files = {p.name for p in (ROOT / "protos").iterdir() if p.name != "__pycache__"}
    assert files == API


def _installed(package: str) -> bool:
    """Whether pyproject's [tool.setuptools.packages.find] puts `package` in the wheel."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    include, exclude = find.get("include", ["*"]), find.get("exclude", [])
    return (any(fnmatch.fnmatch(package, p) for p in include)
            and not any(fnmatch.fnmatch(package, p) for p in exclude))


def test_bench_is_not_installed_but_the_api_is():
    assert not _installed("bench") and not _installed("bench.loadgen")
    assert _installed("protos") and _installed("model")
