"""Versions of everything that can change a number, recorded in every result file."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("flatlora-diffusion", "torch", "transformers", "diffusers", "peft", "pillow", "numpy")


def environment() -> dict:
    """Python, platform and package versions, for reproducibility."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu(), "packages": versions}


def cpu() -> dict:
    """The CPU model, the vector instructions torch's kernels use, and torch's threads: rounding depends on them."""
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text(encoding="utf-8", errors="replace").splitlines() if info.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return {"model": model or platform.processor() or None, "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
