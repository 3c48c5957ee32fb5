"""What Serve's processes wrote to their log files (the session's Ray logs, serve/*.log)."""
from __future__ import annotations

from pathlib import Path

import ray


def serve_logs_since(sizes: dict | None = None, files: str = "*.log") -> tuple[dict, str]:
    """(sizes of Serve's log files `files` (a glob) now, what was written to them since
    `sizes`)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    now = {f: f.stat().st_size for f in logs.glob(files)}
    new = "".join(f.read_bytes()[(sizes or {}).get(f, 0):].decode(errors="replace")
                  for f in sorted(now)) if sizes is not None else ""
    return now, new
