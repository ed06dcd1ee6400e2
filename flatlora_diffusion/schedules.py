"""The learning-rate schedule of the project's pretraining loops (the toy world's stages, `toy:llama`)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int) -> float:
    """The lr factor at `step` of `total`: linear warm-up over 3% of the steps, then cosine decay to 10%."""
    warmup = max(1, int(0.03 * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
