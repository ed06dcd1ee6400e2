"""Image folders: natural-order listing, and loading that skips (and names) what cannot be read."""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from eval.errors import EvalError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def natural_key(path: str | Path) -> list:
    """Sort key that orders ``img2.png`` before ``img10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", Path(path).name)]


@dataclass
class Skipped:
    """A file that was not scored, and why."""

    path: Path
    reason: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "reason": self.reason}


@dataclass
class ImageFolder:
    """The image files of a folder in natural order, and the other files that were skipped."""

    root: Path
    files: list[Path]
    skipped: list[Skipped] = field(default_factory=list)


def list_images(folder: str | Path, flag: str = "--generated", ignore: tuple[Path, ...] = ()) -> ImageFolder:
    """Image files of `folder` (not recursive); non-image files are skipped with a warning.

    Hidden files and the files in `ignore` (e.g. the prompt file kept beside the images) are not listed.
    """
    root = Path(folder)
    if not root.is_dir():
        raise EvalError(f"`{flag}` folder `{root}` does not exist or is not a directory.")
    files, skipped = [], []
    ignored = {p.resolve() for p in ignore}
    for path in sorted(root.iterdir(), key=natural_key):
        if path.name.startswith(".") or not path.is_file() or path.resolve() in ignored:
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        else:
            skipped.append(Skipped(path, "not an image file"))
    if skipped:
        warnings.warn(
            f"`{flag}` folder `{root}`: skipping {len(skipped)} non-image file(s): "
            f"{', '.join(s.path.name for s in skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
            stacklevel=2,
        )
    if not files:
        raise EvalError(
            f"`{flag}` folder `{root}` contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}). "
            "Check the path, or generate the images first."
        )
    return ImageFolder(root, files, skipped)


def decode_image(data: bytes) -> Image.Image:
    """A file's bytes → RGB image; raises `OSError` naming the decoder's complaint when it cannot be read."""
    try:
        image = Image.open(BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise OSError(f"unreadable image ({type(err).__name__}: {err})") from err
    return image.convert("RGB")


def sha256(data: bytes) -> str:
    """Hex SHA-256 of a file's content (the embedding-cache key)."""
    return hashlib.sha256(data).hexdigest()
