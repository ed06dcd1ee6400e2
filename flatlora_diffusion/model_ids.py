"""Built-in model ids, resolved to local folders that load with the usual `from_pretrained` calls.

* ``tiny:sd``, ``tiny:sd-v``, ``tiny:sdxl``, ``tiny:sd3``, ``tiny:flux``, ``tiny:flux-schnell``: tiny random pipelines (`flatlora_diffusion.tiny`, seed 0),
  built on first use into ``$FLATLORA_CACHE`` (default ``~/.cache/flatlora_diffusion``); for fast tests
  of code paths.
* ``toy:sd``, ``toy:clip``, ``toy:vit``, ``toy:oracle``: the pretrained toy world shipped in the package
  (`flatlora_diffusion.toyworld.registry`); for anything that must show learning.
* ``toy:llama``: the toy Llama pretrained on synthetic arithmetic (`flatlora_diffusion.llm.pretrain`),
  shipped in the package; the base of the LLM demo and comparison.

Every other id (a folder, a hub id) is returned unchanged. The trainer, sampling (and so validation,
eval and the app), eval's `--dino_model`/`--clip_model` and `--model` of the LLM evals, the LLM
recipe's `model.name_or_path` and the bench all resolve ids here.
"""

from __future__ import annotations

import os
from pathlib import Path

# `tiny:NAME` -> (tiny.py kind, its builder's options).
TINY_MODELS = {"tiny:sd": ("sd", {"prediction_type": "epsilon"}), "tiny:sd-v": ("sd", {"prediction_type": "v_prediction"}),
               "tiny:sdxl": ("sdxl", {"prediction_type": "epsilon"}), "tiny:sd3": ("sd3", {}), "tiny:flux": ("flux", {}),
               "tiny:flux-schnell": ("flux", {"guidance_embeds": False})}


class ModelIdError(ValueError):
    """A `tiny:`/`toy:` id is unknown or its files are unusable; the message says what exists and the fix."""


def tiny_model_dir(name: str) -> Path:
    """Where `tiny:NAME` lives: ``$FLATLORA_CACHE`` or ``$XDG_CACHE_HOME/flatlora_diffusion`` (``~/.cache``)."""
    root = os.environ.get("FLATLORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flatlora_diffusion"
    return Path(root) / "tiny" / name.split(":", 1)[1]


def resolve_model_id(name: str, flag: str = "model") -> str:
    """The local folder of a `tiny:`/`toy:` id (built or verified first); other ids unchanged.

    `flag` names the option the id came from, for the error message.
    """
    name = str(name)
    if name.startswith("toy:"):
        from flatlora_diffusion.toyworld.registry import ToyModelError, resolve_toy

        try:
            return resolve_toy(name)
        except ToyModelError as err:
            raise ModelIdError(f"`{flag}` {name!r}: {err}") from err
    if not name.startswith("tiny:"):
        return name
    if name not in TINY_MODELS:
        raise ModelIdError(f"`{flag}` {name!r} is not a tiny model; use one of {', '.join(TINY_MODELS)}.")
    path = tiny_model_dir(name)
    if not (path / "model_index.json").is_file():
        from flatlora_diffusion.tiny import build_tiny

        kind, options = TINY_MODELS[name]
        build_tiny(kind, path, seed=0, overwrite=True, **options)
    return str(path)
