"""Atomic file writes, the one helper every module uses: a file is either complete or absent, never half-written.

Everything written here gets the permissions a plain ``open`` / ``mkdir`` would give under the
process umask (``tempfile`` and safetensors make 0600 files, 0700 folders). Temporary files and
folders are hidden siblings named ``.NAME.XXXXXXXX.tmp``; :func:`remove_stale` deletes the ones a
killed process left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

_UMASK = os.umask(0o022)  # read the process umask (there is no getter) ...
os.umask(_UMASK)  # ... and put it back
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what `tempfile` makes from our prefix and suffix


def _temporary_names(path: Path) -> dict:
    return {"prefix": f".{path.name}.", "suffix": ".tmp", "dir": path.parent}


def _set_modes(root: Path) -> None:
    """Give `root` and everything under it the permissions `open` / `mkdir` would under the umask."""
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, fsync: bool = True, **kwargs) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; rename it over `path` only if the body succeeds.

    `fsync=False` skips flushing to disk (for caches, where a lost entry is only recomputed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(**_temporary_names(path))
    try:
        _set_modes(Path(tmp))
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def scratch_dir(near: str | Path) -> Iterator[Path]:
    """An empty hidden folder beside `near` for other libraries to write into; removed on exit."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(**_temporary_names(near)))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill a hidden sibling of folder `path`; it replaces `path` as a whole only if the body succeeds."""
    path = Path(path)
    with scratch_dir(path) as tmp:
        yield tmp
        _set_modes(tmp)
        if not path.exists():
            os.replace(tmp, path)
            return
        with scratch_dir(path) as old:
            os.replace(path, old)  # a folder may be renamed onto an empty one
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise


def remove_stale(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders that killed writers left directly in `folder`."""
    root = Path(folder)
    stale = [p for p in root.iterdir() if _TEMPORARY.match(p.name)] if root.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)


def save_image(image, path: str | Path, **save_kwargs) -> Path:
    """Save a PIL image atomically; the format follows the suffix of `path` (PNG if unknown).

    `save_kwargs` go to `Image.save` (e.g. `pnginfo`).
    """
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_open(path, "wb") as handle:
        image.save(handle, format=fmt, **save_kwargs)
    return path


def save_safetensors(tensors: Mapping, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write torch tensors as a safetensors file atomically (safetensors' own `save_file` makes it 0600)."""
    from safetensors.torch import save

    data = save({key: value.contiguous() for key, value in tensors.items()}, metadata=dict(metadata) if metadata else None)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(root: str | Path, folders: Sequence[str]) -> dict[str, str]:
    """sha256 of every file under `root`/`folders`, keyed by its path relative to `root` (a MANIFEST's record)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for folder in folders
            for p in sorted((root / folder).rglob("*")) if p.is_file()}


def recorded_run(out: str | Path, *, resume: bool, overwrite: bool, error: type[Exception]) -> dict | None:
    """The settings an earlier resumable run recorded in ``out/state/run.json``, or None for a new run.

    ``overwrite`` deletes ``out`` first. A folder that is not empty but holds no run, and ``resume``
    without a run, raise ``error`` naming the fix; the caller compares the recorded settings with its own.
    """
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    run_file = out / "state" / "run.json"
    if run_file.is_file():
        return json.loads(run_file.read_text())["settings"]
    if out.exists() and any(out.iterdir()):
        raise error(f"`{out}` is not empty and holds no pretraining run. Choose another OUT_DIR or pass "
                    "`--overwrite` to delete its contents.")
    if resume:
        raise error(f"`--resume`: `{out}` holds no pretraining run to resume; drop `--resume` to start one.")
    return None


def other_run_message(out: str | Path, recorded: Mapping, given: Mapping) -> str:
    """Why a folder holding a run with other settings is refused, and the three ways on."""
    return (f"`{out}` holds a pretraining run with other settings ({dict(recorded)}; this command: {dict(given)}). "
            "Pass `--resume` to continue that run with its own settings, `--overwrite` to delete it and start "
            "again, or choose another OUT_DIR.")
