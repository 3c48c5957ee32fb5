"""Every name of ours that the deploy configs and the docs give exists: dotted import paths
(`deploy.app:build_app`, `actors.serving.grpc_proxy.add_retryable_status_to_server`,
`python -m bench.engine`) import and resolve, and file paths (`actors/experts/pool.py`, with the
name after `: ` when there is one) exist. Modules move; this fails on the doc they left behind."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "model", "cluster", "protos", "deploy", "bench")
_OURS = "|".join(PACKAGES)
# `module.attr`, `module:attr`: not preceded by a word, dot, slash or dash
# (`a.model.x`, `x/model.y`)
_DOTTED = re.compile(rf"(?<![\w./-])((?:{_OURS})(?:\.\w+)+(?::\w+(?:\.\w+)*)?)")
# `actors/experts/pool.py`, `deploy/nginx/`, `tests/unit/test_linear.py`; a `: name` after a .py
_FILE = re.compile(rf"(?<![\w./-])((?:{_OURS}|tests)/[\w./-]*\w)(?:`?:\s*`?(\w+))?")
# dotted names that are not import paths: Hugging Face file and tensor names
_NOT_IMPORTS = re.compile(r"\.(safetensors|json|yaml|yml|md|py|proto|png|txt|sh|conf)\b"
                          r"|^model\.(layers|embed_tokens|norm)\b")


def documents() -> list[Path]:
    """deploy/*.yaml, README.md and docs/**/*.md."""
    return [*sorted((ROOT / "deploy").glob("*.yaml")), ROOT / "README.md",
            *sorted((ROOT / "docs").rglob("*.md"))]


def dotted_paths(text: str) -> set[str]:
    """The `module.attr` / `module:attr` names of our packages in `text`."""
    return {m.rstrip(".") for m in _DOTTED.findall(text) if not _NOT_IMPORTS.search(m)}


def file_paths(text: str) -> set[tuple[str, str]]:
    """(path, name or "") for each path under our packages or tests/ in `text`."""
    return {(path.rstrip("."), name if path.endswith(".py") else "")
            for path, name in _FILE.findall(text) if "*" not in path}


def resolve(dotted: str) -> object:
    """Import `a.b.c:d.e` (or `a.b.c.d`): the longest importable prefix is the module, the rest
    attributes. ModuleNotFoundError / AttributeError name what is missing; an import error
    inside a module that exists is raised as it is."""
    module, _, attrs = dotted.partition(":")
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise                                   # a missing dependency, not our name
            if i == 1:
                raise
            continue
        for attr in [*parts[i:], *filter(None, attrs.split("."))]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError("unreachable")


def test_patterns_find_our_names_and_skip_others():
    text = ("`deploy.app:build_app`, python -m bench.engine, `model.safetensors`, "
            "model.layers.0.mlp, grpc_health.v1.x, `actors/experts/pool.py: through_restarts`, "
            "deploy/nginx/ and model-*.safetensors.")
    assert dotted_paths(text) == {"deploy.app:build_app", "bench.engine"}
    assert file_paths(text) == {("actors/experts/pool.py", "through_restarts"),
                                ("deploy/nginx", "")}


def test_resolve_fails_on_a_name_that_does_not_exist():
    assert resolve("deploy.app:build_app").__name__ == "build_app"
    assert resolve("actors.serving.grpc_proxy.add_retryable_status_to_server")
    for missing in ("actors.no_such_module", "model.no_such.x", "deploy.app:no_such_builder",
                    "deploy.app:build_app.no_such", "no_such_package.x"):
        with pytest.raises((ImportError, AttributeError)):
            resolve(missing)


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_dotted_path_a_document_names_imports(doc):
    missing = []
    for dotted in sorted(dotted_paths(doc.read_text(encoding="utf-8"))):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as err:
            missing.append(f"{dotted}: {err}")
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {missing}"


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_document_names_exists(doc):
    missing = []
    for path, name in sorted(file_paths(doc.read_text(encoding="utf-8"))):
        if not (ROOT / path).exists():
            missing.append(path)
        elif name and not hasattr(resolve(path[:-3].replace("/", ".")), name):
            missing.append(f"{path}: {name}")
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {missing}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")          # [text](target), images too


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces to
    dashes (`## Faults: no request lost` -> `faults-no-request-lost`)."""
    headings = re.findall(r"^#+\s+(.*\S)", re.sub(r"(?ms)^```.*?^```", "", markdown), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_anchors_follow_github():
    assert anchors("# A b\n```\n# not one\n```\n## Faults: no request lost\n") == \
        {"a-b", "faults-no-request-lost"}


@pytest.mark.parametrize("doc", [d for d in documents() if d.suffix == ".md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in _LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue                                    # http(s):, mailto:
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists() or (anchor and anchor not in anchors(linked.read_text("utf-8"))):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to what does not exist: {broken}"
