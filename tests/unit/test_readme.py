"""The Python code of README.md and docs/**/*.md runs as written, on the tiny demo checkpoint
(tests/conftest.py: doc_code, readme_code). This file runs the in-process blocks and says which
test runs each other one: blocks that need Ray run in tests/integration, those that need a
server in tests/e2e."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
# (document, heading) -> the test file that runs its Python code, calling
# `readme_code("<heading>"` for the README and `doc_code("<document>", "<heading>"` for docs/
RUN_BY = {("README.md", "Python API"): "unit/test_readme.py",
          ("README.md", "Calling it from a Python service"): "e2e/test_grpc.py",
          ("README.md", "OpenAI-compatible HTTP API"): "e2e/test_openai.py",
          ("docs/api.md", "Structured outputs and tools over HTTP"):
              "e2e/test_openai_structured.py",
          ("docs/python-api.md", "In-process engine"): "unit/test_readme.py",
          ("docs/python-api.md", "Prefix caching"): "unit/test_readme.py",
          ("docs/python-api.md", "Trying both on the tiny model"): "unit/test_readme.py",
          ("docs/python-api.md", "Expert parallelism on Ray"): "integration/test_readme_ray.py",
          ("docs/python-api.md", "Several engines, one expert pool"):
              "integration/test_readme_ray.py"}
# the blocks this file runs: (document, heading)
IN_PROCESS = [block for block, runner in RUN_BY.items() if runner == "unit/test_readme.py"]


def _call(doc: str, heading: str) -> str:
    return f'readme_code("{heading}"' if doc == "README.md" else f'doc_code("{doc}", "{heading}"'


def test_every_python_block_is_run_by_a_test(docs_python):
    blocks = {(doc, heading) for doc, sections in docs_python.items() for heading in sections}
    assert blocks == set(RUN_BY), "a document heading with Python code needs a runner"
    for (doc, heading), test_file in RUN_BY.items():
        assert _call(doc, heading) in (TESTS / test_file).read_text(), test_file


def test_docs_are_found_under_docs(docs_python):
    assert "README.md" in docs_python and "docs/python-api.md" in docs_python


def test_sections_split_at_headings_and_skip_other_languages(python_sections):
    text = ("# A\n```python\nx = 1\n```\n```bash\n# not a heading\necho\n```\n"
            "```py\ny = 2\n```\n## B\n```\n# B's\n```\n```python\nz = 3\n```\n")
    assert python_sections(text) == {"A": "x = 1\ny = 2\n", "B": "z = 3\n"}


def test_python_api_block_runs(readme_code, capsys):
    exec(compile(readme_code("Python API"), "README.md (Python API)", "exec"), {})
    assert capsys.readouterr().out        # the streamed text


def test_docs_in_process_engine_block_runs(doc_code):
    code = doc_code("docs/python-api.md", "In-process engine")
    exec(compile(code, "docs/python-api.md (In-process engine)", "exec"), {})


def test_docs_prefix_caching_block_runs(doc_code):
    code = doc_code("docs/python-api.md", "Prefix caching")
    exec(compile(code, "docs/python-api.md (Prefix caching)", "exec"), {})


def test_docs_quantization_block_runs(doc_code):
    code = doc_code("docs/python-api.md", "Trying both on the tiny model")
    exec(compile(code, "docs/python-api.md (Trying both on the tiny model)", "exec"), {})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: the README lines marked '# needs CUDA'")
def test_python_api_block_runs_with_its_cuda_lines(readme_code):
    exec(compile(readme_code("Python API", cuda=True), "README.md (Python API)", "exec"), {})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: the docs' lines marked '# needs CUDA'")
@pytest.mark.parametrize("doc, heading", [b for b in IN_PROCESS if b[0] != "README.md"])
def test_docs_blocks_run_with_their_cuda_lines(doc_code, doc, heading):
    exec(compile(doc_code(doc, heading, cuda=True), f"{doc} ({heading})", "exec"), {})


def test_readme_fits_a_first_hour_and_names_no_project_history():
    text = (TESTS.parent / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, (
        "the README is for a user's first hour: move the rest to docs/")
    history = re.findall(r"(?i)\bissue[- ]\d+|before this release|\bstop \d+", text)
    assert not history, f"the README names the project's history (git log's job): {history}"
