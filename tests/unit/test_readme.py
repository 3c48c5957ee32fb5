"""The README's Python code runs as written, on the tiny demo checkpoint (tests/conftest.py:
readme_code). This file runs the in-process block and says which test runs each other one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
# README heading -> the test file that runs its Python code (calling `readme_code("<heading>"`)
RUN_BY = {"Python API": "unit/test_readme.py",
          "Calling it from a Python service": "e2e/test_grpc.py",
          "OpenAI-compatible HTTP API": "e2e/test_openai.py",
          "Expert parallelism on Ray": "integration/test_readme_ray.py"}


def test_every_python_block_is_run_by_a_test(readme_python):
    assert set(readme_python) == set(RUN_BY), "a README heading with Python code needs a runner"
    for heading, test_file in RUN_BY.items():
        assert f'readme_code("{heading}"' in (TESTS / test_file).read_text(), test_file


def test_sections_split_at_headings_and_skip_other_languages(python_sections):
    text = ("# A\n```python\nx = 1\n```\n```bash\n# not a heading\necho\n```\n"
            "```py\ny = 2\n```\n## B\n```\n# B's\n```\n```python\nz = 3\n```\n")
    assert python_sections(text) == {"A": "x = 1\ny = 2\n", "B": "z = 3\n"}


def test_python_api_block_runs(readme_code, capsys):
    exec(compile(readme_code("Python API"), "README.md (Python API)", "exec"), {})
    assert capsys.readouterr().out        # the streamed text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: the README lines marked '# needs CUDA'")
def test_python_api_block_runs_with_its_cuda_lines(readme_code):
    exec(compile(readme_code("Python API", cuda=True), "README.md (Python API)", "exec"), {})
