"""Versions of everything that can change a number, recorded in every result file."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("flatlora-diffusion", "torch", "transformers", "diffusers", "peft", "pillow", "numpy")


def environment() -> dict:
    """Python, platform and package versions, for reproducibility."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}
