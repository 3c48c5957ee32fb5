"""The Ray block of docs/python-api.md runs as written, in a fresh interpreter whose `ray.init()`
joins the shared local cluster through RAY_ADDRESS (tests/conftest.py: ray_cluster, doc_code)."""
from __future__ import annotations

import os
import subprocess
import sys


def test_readme_ray_code_runs(ray_cluster, doc_code, tmp_path):
    script = tmp_path / "readme_ray.py"
    script.write_text(doc_code("docs/python-api.md", "Expert parallelism on Ray"))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
