"""What a benchmark prints about the machine it ran on, so its figures can be told apart."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess


def cpu_name() -> str:
    """The CPU's model name as `lscpu` prints it (e.g. "AMD EPYC"), else /proc/cpuinfo's,
    else what `platform` knows."""
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average and the core count, e.g. "load 1.23 on 2 cores"."""
    one_minute = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"load {one_minute:.2f} on {os.cpu_count()} cores"
