"""Atomic writes: complete or absent, the permissions a plain `open` / `mkdir` gives, stale temporaries removable."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file

from flatlora_diffusion import files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_respects_the_umask(tmp_path) -> None:
    text = files.write_text(tmp_path / "a.txt", "hello")
    info = PngInfo()
    info.add_text("k", "v")
    image = files.save_image(Image.new("RGB", (4, 4)), tmp_path / "a.png", pnginfo=info)
    weights = files.save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors", {"m": "1"})
    with files.atomic_dir(tmp_path / "folder") as tmp:
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(tmp / "inner.safetensors"))  # a library writing 0600
    for path in (text, image, weights, tmp_path / "folder" / "inner.safetensors"):
        assert _mode(path) == 0o666 & ~_umask(), path.name
    assert _mode(tmp_path / "folder") == 0o777 & ~_umask()
    assert Image.open(image).text["k"] == "v" and load_file(str(weights))["w"].tolist() == [1.0, 1.0]


def test_atomic_dir_replaces_the_folder_whole_or_not_at_all(tmp_path) -> None:
    out = tmp_path / "model"
    with files.atomic_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), files.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with files.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


def test_remove_stale_deletes_only_our_temporaries(tmp_path) -> None:
    (tmp_path / ".README.md.abcd_123.tmp").write_text("half")  # a killed `atomic_open`
    (tmp_path / ".adapter.x1y2z3w4.tmp").mkdir()  # a killed `scratch_dir`
    (tmp_path / ".adapter.x1y2z3w4.tmp" / "w.safetensors").write_text("half")
    keep = [".cache", "notes.tmp", ".notes.tmp", "README.md", ".a.toolong123.tmp"]
    for name in keep:
        (tmp_path / name).write_text("mine")
    removed = files.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".README.md.abcd_123.tmp", ".adapter.x1y2z3w4.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert files.remove_stale(tmp_path / "missing") == []
