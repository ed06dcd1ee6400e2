"""On-disk embedding cache keyed by model and file content.

Layout: ``<cache_dir>/<model key>/<sha256 of the image file>.npy``. The model key hashes the
model's weights and config, the preprocessing and the dtype, so a changed checkpoint, crop or
precision never reuses stale vectors, and a renamed or copied image still hits. Entries are
written atomically: concurrent runs may share a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from flatlora_diffusion.files import atomic_open, write_text


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flatlora_eval/embeddings`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flatlora_eval" / "embeddings"


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's class, config and every parameter and buffer (names, shapes, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class EmbeddingCache:
    """Vectors of one (model, preprocessing, dtype), stored one `.npy` file per image content hash."""

    def __init__(self, cache_dir: str | Path, key_parts: dict) -> None:
        blob = json.dumps(key_parts, sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:24]
        self.dir = Path(cache_dir) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "info.json"
        if not info.exists():  # for people browsing the cache; never read back
            write_text(info, json.dumps(key_parts, indent=2, sort_keys=True) + "\n")

    def get(self, digest: str) -> torch.Tensor | None:
        """The cached vector for a file hash, or None (a corrupt entry counts as a miss)."""
        path = self.dir / f"{digest}.npy"
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None

    def put(self, digest: str, vector: torch.Tensor) -> None:
        """Store one vector (float32) atomically."""
        with atomic_open(self.dir / f"{digest}.npy", "wb", fsync=False) as handle:
            np.save(handle, vector.detach().float().cpu().numpy(), allow_pickle=False)
