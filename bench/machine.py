"""What a benchmark prints about the machine it ran on, so its figures can be told apart, and
the device and compute dtype it runs on (the same flags and defaults in every bench)."""
from __future__ import annotations

import argparse
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


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    """--device (default cpu) and --dtype (default: `compute_dtype`'s)."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")


def compute_dtype(args: argparse.Namespace):
    """The torch dtype a bench computes in: --dtype, else float32 on CPU, bfloat16 on CUDA."""
    from model.checkpoint import torch_dtype  # torch only for the benches that run a model
    return torch_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda")
                                      else "float32"))
