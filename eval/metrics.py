"""The metric math, on embeddings only: raw cosines, all pairs vs matched pairs, subject means.

Every function takes un-normalised embeddings (rows) and returns a plain float. No scaling
(no ×100, no ×2.5, no clipping): a cosine of 0.3 is reported as 0.3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty (N, D) matrix of embeddings, got shape {tuple(x.shape)}.")
    return F.normalize(x.double(), dim=-1)  # float64: means over thousands of pairs stay exact


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) × (M, D) → (N, M) cosine similarities."""
    a, b = _rows(a, "a"), _rows(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Embedding widths differ: {a.shape[1]} vs {b.shape[1]} (embeddings from different models?).")
    return a @ b.T


def all_pairs_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine over all (generated, reference) pairs: DINO and CLIP-I of one subject."""
    return cosine_matrix(generated, reference).mean().item()


def matched_cosines(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(N, D) × (N, D) → (N,) cosine of row i of `images` with row i of `texts`."""
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"Matched pairs need as many texts as images, got {texts.shape[0]} and {images.shape[0]}.")
    a, b = _rows(images, "images"), _rows(texts, "texts")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Embedding widths differ: {a.shape[1]} vs {b.shape[1]} (embeddings from different models?).")
    return (a * b).sum(-1)


def matched_pairs_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine over matched (image i, text i) pairs: CLIP-T (each image with its own prompt only)."""
    return matched_cosines(images, texts).mean().item()


def within_set_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine over ordered pairs (i, j), i ≠ j, of one set: the "real images" reference row."""
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"Need at least 2 images for pairwise similarity within a set, got {n}.")
    sims = cosine_matrix(embeddings, embeddings)
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


def diversity(groups: Sequence[torch.Tensor]) -> float:
    """DIV: 1 − mean within-prompt similarity, averaged over prompts (groups of ≥ 2 images)."""
    sims = [within_set_similarity(g) for g in groups if g.shape[0] >= 2]
    if not sims:
        raise ValueError("DIV needs at least one prompt with 2 or more images (`--images_per_prompt` >= 2).")
    return 1.0 - sum(sims) / len(sims)


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n); the s.e. is NaN for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("Cannot average an empty list of scores.")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
