"""`toy:NAME` model ids: the pretrained toy world shipped in the package, checked against its checksums.

    toy:sd      StableDiffusionPipeline (64 px, v-prediction)     DiffusionPipeline.from_pretrained
    toy:clip    CLIPModel + CLIPProcessor (for CLIP-I / CLIP-T)     CLIPModel.from_pretrained
    toy:vit     ViTModel + ViTImageProcessor (the DINO stand-in)    AutoModel.from_pretrained
    toy:oracle  the judge (toyworld.oracle.load_oracle)
    toy:llama   LlamaForCausalLM + byte tokenizer (arithmetic)    AutoModelForCausalLM.from_pretrained

The folder is ``flatlora_diffusion/toyworld/weights/`` (``$FLATLORA_TOY_DIR`` points elsewhere, e.g.
at a freshly pretrained world); ``toy:llama`` has its own, ``flatlora_diffusion/llm/weights/``
(``$FLATLORA_TOY_LLM_DIR``), made by `flatlora_diffusion.llm.pretrain`. Each ``MANIFEST.json`` records
the command that built it and the sha256 of every file; a missing or altered file is an error that
names it and the rebuild command.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from flatlora_diffusion.files import atomic_dir, sha256_file

TOY_MODELS = {"toy:sd": "sd", "toy:clip": "clip", "toy:vit": "vit", "toy:oracle": "oracle"}
TOY_LLM_MODELS = {"toy:llama": "llama"}
SHIPPED_DIR = Path(__file__).with_name("weights")
LLM_SHIPPED_DIR = Path(__file__).resolve().parents[1] / "llm" / "weights"
REBUILD = ("python -m flatlora_diffusion.toyworld pretrain OUT_DIR --minutes 90 (then point FLATLORA_TOY_DIR "
           "at OUT_DIR, or copy its sd/ clip/ vit/ oracle/ and MANIFEST.json into {dir})")
LLM_REBUILD = ("python -m flatlora_diffusion.llm pretrain OUT_DIR --minutes 40, then `python -m "
               "flatlora_diffusion.llm ship OUT_DIR` (writes {dir}) or point FLATLORA_TOY_LLM_DIR at OUT_DIR")


class ToyModelError(ValueError):
    """A `toy:` id is unknown or its shipped files are missing or damaged; the message says how to fix it."""


def toy_dir() -> Path:
    """The folder holding the toy models: ``$FLATLORA_TOY_DIR`` or the shipped one."""
    return Path(os.environ.get("FLATLORA_TOY_DIR") or SHIPPED_DIR)


def toy_llm_dir() -> Path:
    """The folder holding `toy:llama`: ``$FLATLORA_TOY_LLM_DIR`` or the shipped one."""
    return Path(os.environ.get("FLATLORA_TOY_LLM_DIR") or LLM_SHIPPED_DIR)


@cache
def _verified(root: Path, folder: str, stamp: tuple, rebuild: str = REBUILD) -> Path:
    rebuild = rebuild.format(dir=root)
    manifest_path = root / "MANIFEST.json"
    if not manifest_path.is_file():
        raise ToyModelError(f"The toy models are missing: `{manifest_path}` does not exist. Rebuild them with: {rebuild}")
    try:
        expected = json.loads(manifest_path.read_text())["sha256"]
    except (OSError, ValueError, KeyError) as err:
        raise ToyModelError(f"`{manifest_path}` is damaged ({err}). Restore it from git or rebuild: {rebuild}") from err
    files = {name: digest for name, digest in expected.items() if name.startswith(f"{folder}/")}
    for name, digest in sorted(files.items()):
        path = root / name
        if not path.is_file():
            raise ToyModelError(f"Toy model file `{path}` is missing. Restore it (`git checkout -- {path}`) "
                                f"or rebuild the toy models: {rebuild}")
        if sha256_file(path) != digest:
            raise ToyModelError(f"Toy model file `{path}` does not match its checksum in `{manifest_path}` (damaged "
                                f"or replaced). Restore it (`git checkout -- {path}`) or rebuild: {rebuild}")
    if not files:
        raise ToyModelError(f"`{manifest_path}` lists no files for `{folder}/`; rebuild the toy models: {rebuild}")
    return root / folder


def resolve_toy(name: str) -> str:
    """The local folder of `toy:NAME`, after checking every file of it against ``MANIFEST.json``."""
    if name in TOY_LLM_MODELS:
        root, folder, rebuild = toy_llm_dir().resolve(), TOY_LLM_MODELS[name], LLM_REBUILD
    elif name in TOY_MODELS:
        root, folder, rebuild = toy_dir().resolve(), TOY_MODELS[name], REBUILD
    else:
        raise ToyModelError(f"Unknown toy model {name!r}; the toy models are "
                            f"{', '.join([*TOY_MODELS, *TOY_LLM_MODELS])}.")
    # Re-verify when a file changes (size or mtime), not on every call.
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted((root / folder).rglob("*"))
                  if p.is_file()) if (root / folder).is_dir() else ()
    manifest = root / "MANIFEST.json"
    stamp += ((manifest.stat().st_mtime_ns,) if manifest.is_file() else ())
    return str(_verified(root, folder, stamp, rebuild))


def ship(source: str | Path) -> Path:
    """Check a pretrained world (`pretrain OUT_DIR`) against its manifest, then copy it into the package."""
    import shutil

    source = Path(source).resolve()
    for name in TOY_MODELS:
        _verified(source, TOY_MODELS[name], ())
    with atomic_dir(SHIPPED_DIR) as tmp:
        for folder in TOY_MODELS.values():
            shutil.copytree(source / folder, tmp / folder)
        shutil.copy2(source / "MANIFEST.json", tmp / "MANIFEST.json")
    return SHIPPED_DIR


def ship_llama(source: str | Path) -> Path:
    """Check a pretrained toy Llama (`llm pretrain OUT_DIR`) against its manifest, then copy it into the package."""
    import shutil

    source = Path(source).resolve()
    _verified(source, TOY_LLM_MODELS["toy:llama"], (), LLM_REBUILD)
    with atomic_dir(LLM_SHIPPED_DIR) as tmp:
        shutil.copytree(source / "llama", tmp / "llama")
        shutil.copy2(source / "MANIFEST.json", tmp / "MANIFEST.json")
    return LLM_SHIPPED_DIR
