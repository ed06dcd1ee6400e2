"""Settings of the flatness meter, checked once with every problem reported together."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flatlora_diffusion.flat_lora import SAMPLER_CHOICES

DEFAULT_RADII = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
DTYPES = ("float32", "float16", "bfloat16")


class FlatnessError(ValueError):
    """Bad input to the meter, found before any measurement; lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("Cannot measure flatness:\n  - " + "\n  - ".join(self.errors))


def _f(default, help_text: str):
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class FlatnessConfig:
    """What to measure (`python -m flatlora_diffusion.flatness --help` shows the same help)."""

    base: str = _f("", "Base model the adapters were trained on: a diffusers SD/SDXL pipeline (folder, Hub id, "
                       "`toy:sd`, `tiny:sd`) or a causal LM folder (the LLM recipe's `model.name_or_path`).")
    adapters: dict[str, str] = _f({}, "Adapter name -> folder: a DreamBooth trainer `--output_dir`, or an LLM "
                                      "run folder / its `adapter/` (peft).")
    data: str = _f("", "Held-out data: a folder of images (diffusion: a DreamBooth instance folder) or a "
                       ".jsonl file of GSM8K-format rows `question`/`answer` (LLM).")
    out: str | None = _f(None, "Output folder: flatness.json, flatness.csv, flatness.png, directions.png.")
    radii: tuple[float, ...] = _f(DEFAULT_RADII, "Noise radii r in [0, 1]: σ_i = r·‖W'_i‖/√n, the paper's ρ.")
    draws: int = _f(8, "Noise draws K per radius (the mean's standard error shrinks as 1/√K); at least 2.")
    directions: int = _f(2, "Random filter-normalised directions for the 1-D loss curves (0: none).")
    alpha_points: int = _f(11, "Points of each 1-D curve, evenly spaced on [-direction_scale, direction_scale].")
    direction_scale: float = _f(0.2, "Largest step α along a direction (α = r: the step's row norm is r·‖W'_i‖).")
    samples: int = _f(16, "Held-out examples: (image, timestep, noise) triples, or text rows (LLM, the first N).")
    batch_size: int = _f(16, "Examples per forward pass.")
    prompt: str | None = _f(None, "Diffusion: the prompt of the images (a `NAME.txt` beside an image overrides "
                                  "it); default: the adapters' instance prompt.")
    resolution: int | None = _f(None, "Diffusion: image side in pixels; default: the adapters' training resolution.")
    template: str = _f("gsm8k", "LLM: prompt template of the rows (`flatlora_diffusion.llm.data.TEMPLATES`).")
    max_length: int = _f(512, "LLM: rows longer than this many tokens are skipped.")
    seed: int = _f(0, "Seed of the held-out triples, the noise draws and the directions (the same for every "
                      "adapter).")
    sampler: str = _f("gaussian", "Noise sampler of the Flat-LoRA core: `gaussian` (exact, as the paper), "
                                  "`pooled` (faster on CPU) or `auto`.")
    device: str = _f("auto", "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ...")
    dtype: str = _f("float32", "Weight dtype of the base model: float32, float16 or bfloat16.")

    def __post_init__(self) -> None:
        for name in ("base", "data", "out"):  # paths as text: the settings go into the JSON report
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.adapters, dict):
            self.adapters = {str(k): os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in self.adapters.items()}
        self.radii = tuple(sorted({float(r) for r in self.radii})) if _numbers(self.radii) else self.radii
        errors = self.check()
        if errors:
            raise FlatnessError(errors)

    def check(self) -> list[str]:
        errors = []
        if not self.base:
            errors.append("`--base` is required: the base model the adapters were trained on.")
        if not self.adapters:
            errors.append("`--adapters` needs at least one NAME=DIR.")
        if not self.data:
            errors.append("`--data` is required: an image folder (diffusion) or a .jsonl file (LLM).")
        if not _numbers(self.radii) or not self.radii:
            errors.append(f"`--radii` must be a list of numbers, got {self.radii!r}.")
        else:
            bad = [r for r in self.radii if not math.isfinite(r) or not 0 <= r <= 1]
            if bad:
                errors.append(f"`--radii` must lie in [0, 1] (the paper uses 0.01-0.2), got {bad}.")
        for name, low in (("draws", 2), ("directions", 0), ("samples", 1), ("batch_size", 1), ("max_length", 8)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                errors.append(f"`--{name}` must be an integer >= {low}, got {value!r}.")
        if not isinstance(self.alpha_points, int) or self.alpha_points < 3 or self.alpha_points % 2 == 0:
            errors.append(f"`--alpha_points` must be an odd integer >= 3 (so that α = 0 is a point), "
                          f"got {self.alpha_points!r}.")
        if not isinstance(self.direction_scale, (int, float)) or not 0 < self.direction_scale <= 1:
            errors.append(f"`--direction_scale` must be a number in (0, 1], got {self.direction_scale!r}.")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8
                                            or self.resolution % 8):
            errors.append(f"`--resolution` must be a positive multiple of 8, got {self.resolution!r}.")
        if self.sampler not in SAMPLER_CHOICES:
            errors.append(f"`--sampler` must be one of {', '.join(SAMPLER_CHOICES)}, got {self.sampler!r}.")
        if self.dtype not in DTYPES:
            errors.append(f"`--dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            errors.append(f"`--out` `{self.out}` is a file; give a folder (created if missing).")
        if self.prompt is not None and not self.prompt.strip():
            errors.append("`--prompt` is empty; give the prompt of the images or leave it out.")
        return errors

    @property
    def alphas(self) -> list[float]:
        """The 1-D curves' steps: `alpha_points` values evenly spaced on ±`direction_scale`, 0 in the middle."""
        half = self.alpha_points // 2
        return [self.direction_scale * k / half for k in range(-half, half + 1)]

    def to_dict(self) -> dict:
        """The settings as JSON values (radii as a list)."""
        return asdict(self) | {"radii": list(self.radii)}


def _numbers(values) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
