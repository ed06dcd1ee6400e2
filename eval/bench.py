"""`python -m eval bench-scoring`: images per second of fidelity scoring (read, preprocess, DINO + CLIP).

`images_per_s` is end to end (read, hash, decode, both preprocessing pipelines, both models);
`forward_only_images_per_s` is each model alone on a ready batch.

    python -m eval bench-scoring --tiny --images 64 --dataset data/dreambench   # tiny random models
    python -m eval bench-scoring --device cuda --dtype float16 --images 512     # the real models

The cache is off while timing, model loading is excluded, one warm-up batch runs first.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval.config import ScoringConfig
from eval.embedders import ImageEncoder
from eval.images import IMAGE_SUFFIXES


def _images(folder: Path, dataset: str | None, count: int) -> list[Path]:
    """`count` image files: DreamBench images (cycled) or 512×512 noise written to `folder`."""
    if dataset:
        pool = sorted(p for p in Path(dataset).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if pool:
            return [pool[i % len(pool)] for i in range(count)]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"noise_{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _forward_rate(embedder, paths: list[Path], repeats: int = 3) -> float:
    """Images/s of one model's forward pass alone, on an already preprocessed batch."""
    pixels = embedder.preprocess.batch([Image.open(p).convert("RGB") for p in paths]).to(embedder.device, embedder.dtype)
    with torch.inference_mode():
        embedder._forward(pixels)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            embedder._forward(pixels)
    return round(repeats * len(paths) / (time.perf_counter() - start), 1)


def bench_scoring(config: ScoringConfig, images: int = 64, dataset: str | None = None, tiny: bool = False) -> dict:
    """Time `ImageEncoder.encode` on `images` files; returns images/s and the setup."""
    config = dataclasses.replace(config, no_cache=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if tiny:
            from flatlora_diffusion.tiny import build_tiny

            config = dataclasses.replace(
                config, dino_model=str(build_tiny("dino", tmp / "dino")), clip_model=str(build_tiny("clip", tmp / "clip"))
            )
        encoder = ImageEncoder.from_config(config)
        paths = _images(tmp, dataset, images)
        encoder.encode(paths[: config.batch_size], desc="warm-up")
        start = time.perf_counter()
        encoder.encode(paths, desc="bench")
        seconds = time.perf_counter() - start
        forward = {e.name: _forward_rate(e, paths[: config.batch_size]) for e in encoder.embedders}
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "forward_only_images_per_s": forward,
        "source": "dreambench" if dataset else "noise 512x512",
        "models": "tiny random (flatlora_diffusion.tiny)" if tiny else {"dino": config.dino_model, "clip": config.clip_model},
        "device": config.device,
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "torch_threads": torch.get_num_threads(),
    }


def main(config: ScoringConfig, images: int, dataset: str | None, tiny: bool) -> int:
    """Print the benchmark as JSON."""
    print(json.dumps(bench_scoring(config, images, dataset, tiny), indent=2))
    return 0
