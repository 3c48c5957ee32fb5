"""The Ray blocks of docs/python-api.md run as written, each in a fresh interpreter whose
`ray.init()` joins the shared local cluster through RAY_ADDRESS (tests/conftest.py: ray_cluster,
doc_code)."""
from __future__ import annotations

import os
import subprocess
import sys


def run(ray_cluster, code: str, tmp_path) -> None:
    """Run `code` in a fresh interpreter joined to the shared local cluster."""
    script = tmp_path / "readme_ray.py"
    script.write_text(code)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_readme_ray_code_runs(ray_cluster, doc_code, tmp_path):
    run(ray_cluster, doc_code("docs/python-api.md", "Expert parallelism on Ray"), tmp_path)


def test_the_shared_pool_block_runs(ray_cluster, doc_code, tmp_path):
    """Issue 24: two RayEngines on one SharedExpertPool, as docs/python-api.md shows them."""
    run(ray_cluster, doc_code("docs/python-api.md", "Several engines, one expert pool"), tmp_path)
