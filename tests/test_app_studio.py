"""The app's logic without a browser: same seed, adapter switching, compare columns, PNG chunks, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flatlora_diffusion import app_studio
from flatlora_diffusion.adapters import WEIGHTS_NAME
from flatlora_diffusion.app_studio import Limits, Studio, StudioError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adapter_root(sd_adapter_dir, sdxl_adapter_dir, tmp_path_factory):
    """A trainer output folder as users have them: a good SD adapter, an SDXL one, and two bad files."""
    root = tmp_path_factory.mktemp("app_adapters")
    shutil.copytree(sd_adapter_dir, root / "runs" / "dog")
    shutil.copytree(sdxl_adapter_dir, root / "xl")
    (root / "broken").mkdir()
    (root / "broken" / WEIGHTS_NAME).write_bytes(b"\x00garbage")  # a crashed copy
    (root / "pickled").mkdir()
    torch.save({"unet.lora_A": torch.zeros(2)}, root / "pickled" / WEIGHTS_NAME)  # pickle under a safe name
    return root


@pytest.fixture(scope="module")
def studio(tiny_sd_path, adapter_root):
    studio = Studio.open(str(tiny_sd_path), [adapter_root, adapter_root / "not-yet"])
    yield studio
    studio.close()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_discovery_shows_settings_problems_and_skipped_files(studio, adapter_root):
    assert list(studio.adapters) == ["runs_dog", "xl"]
    text = studio.describe()
    for expected in ("| `runs_dog` | Flat-LoRA (ρ 0.1, cosine) | 4 / 8 | 2 | a photo of sks dog |",
                     "⚠ trained for SDXL; this app's base is SD", "not-yet` does not exist (yet)",
                     f"`{adapter_root.name}/broken`", f"`{adapter_root.name}/pickled`",
                     "is not a valid safetensors file"):
        assert expected in text, expected
    # The page is served to every client: folders relative to their adapter root, the base by its name.
    assert str(adapter_root.parent) not in text and str(studio.base_model) not in text
    assert f"**Base model** `{Path(studio.base_model).name}`" in text
    assert {folder.name for folder, _ in studio.skipped} == {"broken", "pickled"}


def test_same_seed_same_image_and_settings_in_png(studio):
    settings = studio.settings("a photo of sks dog", seed=5, steps=2, num_images=2, scheduler="euler")
    first, again = studio.generate(settings, {"runs_dog": 1.0}), studio.generate(settings, {"runs_dog": 1.0})
    assert [column.label for column in first.columns] == ["runs_dog ×1"]
    pairs = zip(first.columns[0].images, again.columns[0].images, strict=True)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in pairs)
    assert not np.array_equal(_pixels(first.columns[0].images[0]), _pixels(first.columns[0].images[1]))  # seed 5, 6
    with Image.open(first.columns[0].paths[1]) as png:
        chunk = json.loads(png.text["flatlora"])
        assert "Seed: 6" in png.text["parameters"]
    assert chunk["settings"]["seed"] == 6 and chunk["settings"]["scheduler"] == "euler"
    assert chunk["adapters"] == {"runs_dog": 1.0} and chunk["base_model"] == studio.base_label == Path(studio.base_model).name
    assert first.gallery()[1] == (str(first.columns[0].paths[1]), "runs_dog ×1 · seed 6")


def test_compare_adapter_changes_image_and_scale_zero_equals_base(studio):
    settings = studio.settings("a photo of sks dog", seed=1, steps=2)
    full = studio.compare(settings, {"runs_dog": 1.0})
    zero = studio.compare(settings, {"runs_dog": 0.0})
    assert [column.label for column in full.columns] == ["base", "runs_dog ×1"]
    base, adapted = (_pixels(column.images[0]) for column in full.columns)
    assert np.abs(base - adapted).max() > 20, "the adapter must change the image"
    assert np.array_equal(_pixels(zero.columns[1].images[0]), base), "scale 0 must equal the base model"
    assert np.array_equal(_pixels(zero.columns[0].images[0]), base), "the base column must not depend on the adapter"
    assert "1 image(s) × 2 column(s) (base | runs_dog ×0)" in zero.summary()


def test_base_loaded_once_adapters_switched_by_name(tiny_sd_path, adapter_root, monkeypatch, tmp_path):
    pipelines, adapter_loads = [], []
    monkeypatch.setattr(app_studio, "load_pipeline", lambda *a, **k: pipelines.append(1) or _load(*a, **k))
    monkeypatch.setattr(app_studio, "load_adapter", lambda pipe, path, name: adapter_loads.append(name) or
                        _load_adapter(pipe, path, name))
    root = tmp_path / "adapters"
    shutil.copytree(adapter_root / "runs" / "dog", root / "dog")
    studio = Studio.open(str(tiny_sd_path), [root], out_dir=tmp_path / "out")
    pipe = studio.pipe
    settings = studio.settings("a photo of sks dog", seed=0, steps=1)
    for adapters in ({"dog": 1.0}, {}, {"dog": 0.5}):
        studio.generate(settings, adapters)
    assert studio.pipe is pipe and pipelines == [1] and adapter_loads == ["dog"]
    weights = root / "dog" / WEIGHTS_NAME
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # re-trained
    studio.generate(settings, {"dog": 1.0})
    assert adapter_loads == ["dog", "dog"], "a re-trained adapter must be reloaded"
    progress = []
    studio.compare(studio.settings("x", steps=1, num_images=2), {"dog": 1.0}, progress=lambda *p: progress.append(p))
    assert [p[:2] for p in progress] == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(list((tmp_path / "out").glob("request-*/*.png"))) == 3 + 1 + 2 * 2


def _load(*args, **kwargs):
    from flatlora_diffusion.sampling import load_pipeline

    return load_pipeline(*args, **kwargs)


def _load_adapter(pipe, path, name):
    from flatlora_diffusion.adapters import load_adapter

    return load_adapter(pipe, path, name)


@pytest.mark.parametrize("request_kwargs, match", [
    ({"steps": 0}, r"`steps` must be an integer in \[1, 100\], got 0"),
    ({"steps": 5000}, r"`steps` must be an integer in \[1, 100\], got 5000"),
    ({"width": 2048}, r"`width` must be an integer in \[64, 1024\], got 2048"),
    ({"height": 100}, r"`height` must be a multiple of 8, got 100"),
    ({"num_images": 9}, r"`number of images` must be an integer in \[1, 8\]"),
    ({"guidance_scale": 99}, r"`guidance scale` must be a number in \[0, 30\]"),
    ({"seed": -1}, r"`seed` must be an integer"),
    ({"scheduler": "../../evil"}, r"`scheduler` must be one of default, ddim"),
    ({"prompt": "x" * 1001}, r"`prompt` must be text of at most 1000 characters"),
])
def test_out_of_range_requests_are_refused(studio, request_kwargs, match):
    kwargs = {"prompt": "a dog", "steps": 2} | request_kwargs
    with pytest.raises(StudioError, match=match):
        studio.settings(**kwargs)


def test_several_errors_reported_together(studio):
    with pytest.raises(StudioError, match=r"(?s)`steps`.*`width`.*`height`"):
        studio.settings("a dog", steps=0, width=4096, height=4096)


@pytest.mark.parametrize("adapters, match", [
    ({"xl": 1.0}, r"Adapter `xl` cannot be used: trained for SDXL; this app's base is SD"),
    ({"../runs/dog": 1.0}, r"Unknown adapter '../runs/dog' \(known: `runs_dog`, `xl`\)"),
    ({"broken": 1.0}, r"Unknown adapter 'broken'"),
    ({"runs_dog": 7.0}, r"scale of `runs_dog` must be a number in \[-2.0, 2.0\], got 7.0"),
    ({"runs_dog": float("nan")}, r"scale of `runs_dog`"),
])
def test_bad_adapters_are_refused_and_studio_keeps_serving(studio, adapters, match):
    settings = studio.settings("a dog", steps=1)
    with pytest.raises(StudioError, match=match):
        studio.compare(settings, adapters)
    assert len(studio.compare(settings, {"runs_dog": 1.0}).columns) == 2


def test_adapter_corrupted_or_replaced_after_scan(tiny_sd_path, sd_adapter_dir, tmp_path):
    root = tmp_path / "adapters"
    for name in ("good", "corrupt", "pickled"):
        shutil.copytree(sd_adapter_dir, root / name)
    studio = Studio.open(str(tiny_sd_path), [root], out_dir=tmp_path / "out")
    assert list(studio.adapters) == ["corrupt", "good", "pickled"]
    (root / "corrupt" / WEIGHTS_NAME).write_bytes(b"\x00" * 64)  # e.g. a second training run crashed mid-copy
    torch.save({"x": torch.zeros(1)}, root / "pickled" / WEIGHTS_NAME)
    settings = studio.settings("a dog", steps=1)
    for name in ("corrupt", "pickled"):
        with pytest.raises(StudioError, match=rf"Adapter `{name}` cannot be used: .* is not a valid safetensors file"):
            studio.generate(settings, {name: 1.0})
    assert studio.generate(settings, {"good": 1.0}).columns[0].paths[0].is_file()
    shutil.rmtree(root / "good")
    studio.scan()
    assert studio.adapters == {} and not studio._loaded  # the bad ones are now listed as skipped
    assert sorted(folder.name for folder, _ in studio.skipped) == ["corrupt", "pickled"]


def test_too_many_adapters_and_bad_limits(studio):
    with pytest.raises(StudioError, match="Select at most 4 adapters"):
        studio.generate(studio.settings("a", steps=1), {f"a{i}": 1.0 for i in range(5)})
    with pytest.raises(ValueError, match="`max_side` must be a multiple of 8"):
        Limits(max_side=100)
    with pytest.raises(ValueError, match="`max_adapters` .* cannot exceed `max_loaded`"):
        Limits(max_adapters=9)


def test_concurrent_requests_wait_instead_of_colliding(studio):
    from concurrent.futures import ThreadPoolExecutor

    settings = studio.settings("a photo of sks dog", seed=2, steps=1)
    requests = [{"runs_dog": 1.0}, {}, {"runs_dog": 0.5}, {}]
    expected = [_pixels(studio.generate(settings, adapters).columns[0].images[0]) for adapters in requests]
    with ThreadPoolExecutor(len(requests)) as pool:  # adapters switch between requests, never during one
        results = list(pool.map(lambda adapters: studio.generate(settings, adapters), requests))
    assert all(np.array_equal(_pixels(r.columns[0].images[0]), e) for r, e in zip(results, expected, strict=True))


def test_loads_exactly_the_checked_weights_file(tiny_sd_path, sd_adapter_dir, tmp_path, monkeypatch):
    from diffusers.loaders import lora_base
    from safetensors.torch import load_file, save_file

    root = tmp_path / "adapters"
    shutil.copytree(sd_adapter_dir, root / "dog")
    decoy = tmp_path / "outside" / "zeros.safetensors"  # same layers, all zero: the base model's image
    decoy.parent.mkdir()
    save_file({key: torch.zeros_like(value) for key, value in load_file(root / "dog" / WEIGHTS_NAME).items()}, decoy)
    for name in ("a_" + WEIGHTS_NAME, "z_" + WEIGHTS_NAME):  # both sides of the checked name, whatever the order
        (root / "dog" / name).symlink_to(decoy)

    def guess(*args, **kwargs):
        raise AssertionError("diffusers was left to guess which weights file to load")

    monkeypatch.setattr(lora_base, "_best_guess_weight_name", guess)
    studio = Studio.open(str(tiny_sd_path), [root], out_dir=tmp_path / "out")
    result = studio.compare(studio.settings("a photo of sks dog", seed=1, steps=2), {"dog": 1.0})
    base, adapted = (_pixels(column.images[0]) for column in result.columns)
    assert np.abs(base - adapted).max() > 20, "the checked adapter, not the all-zero decoy, must be loaded"


def test_oversized_metadata_is_cut_in_the_table(tiny_sd_path, sd_adapter_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from flatlora_diffusion.adapters import METADATA_KEY
    from flatlora_diffusion.app_ui import _default_prompt

    weights = sd_adapter_dir / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    facts = json.loads(metadata[METADATA_KEY])
    facts["training"] |= {"instance_prompt": "sks " * 50_000, "steps": "9" * 10_000}
    facts["base_model"] = "/srv/secret/" + "m" * 5_000
    (tmp_path / "adapters" / "huge").mkdir(parents=True)
    save_file(load_file(weights), tmp_path / "adapters" / "huge" / WEIGHTS_NAME,
              metadata | {METADATA_KEY: json.dumps(facts)})
    studio = Studio.open(str(tiny_sd_path), [tmp_path / "adapters"], out_dir=tmp_path / "out")
    assert list(studio.adapters) == ["huge"]
    row = next(line for line in studio.describe().splitlines() if line.startswith("| `huge`"))
    assert len(row) < 8 * (app_studio.MAX_CELL_CHARS + 30), len(row)
    assert "sks sks" in row and "… (200000 characters)" in row and "… (10000 characters)" in row
    assert "/srv/secret" not in row  # an absolute base path from the metadata is shown by its name
    assert _default_prompt(studio) == "a photo of a dog"  # too long for the prompt box: not its default


def test_total_work_of_a_request_is_capped_with_an_estimate(studio):
    big = studio.settings("a dog", steps=100, num_images=8, width=1024, height=1024)
    with pytest.raises(StudioError, match=r"8 image\(s\) × 2 column\(s\) × 100 steps × 1024×1024 px = 1678 "
                                          r"megapixel-steps \(.*\); the limit \(`--max-work`\) is 800"):
        studio.compare(big, {"runs_dog": 1.0})
    studio.generate(studio.settings("a dog", steps=1))  # measures this server's speed
    with pytest.raises(StudioError, match=r"megapixel-steps \(about .* at this server's measured speed\)"):
        studio.generate(big)
    with pytest.raises(ValueError, match="`max_work` must be a positive integer"):
        Limits(max_work=0)


def test_generation_stops_when_asked(studio):
    asked = []
    settings = studio.settings("a dog", steps=3, num_images=2)
    with pytest.raises(StudioError, match=r"Stopped: the client went away \(0 of 2 images drawn\)"):
        studio.generate(settings, stop=lambda: asked.append(1) or len(asked) >= 2)
    assert len(asked) == 2, "the pipeline must stop at the step it is told to, not after all 2 × 3 steps"
    assert len(studio.generate(settings).columns[0].images) == 2  # and the studio keeps serving


def test_flux_base_with_its_adapters_side_by_side_and_other_families_refused(tiny_flux_path, tiny_sd3_path,
                                                                             tmp_path_factory):
    from conftest import save_random_adapter

    root = tmp_path_factory.mktemp("dit_adapters")
    save_random_adapter(tiny_flux_path, root / "flux_dog")
    save_random_adapter(tiny_sd3_path, root / "sd3_dog")
    studio = Studio.open(str(tiny_flux_path), [root])
    try:
        assert set(studio.adapters) == {"flux_dog", "sd3_dog"}
        assert "⚠ trained for SD3; this app's base is FLUX" in studio.describe()
        settings = studio.settings("a photo of sks dog", seed=1, steps=2, width=64, height=64, guidance_scale=3.5)
        result = studio.compare(settings, {"flux_dog": 1.0})
        base, adapted = (_pixels(column.images[0]) for column in result.columns)
        assert np.abs(base - adapted).max() > 0, "the adapter must change the image"
        with pytest.raises(StudioError, match="trained for SD3"):
            studio.compare(settings, {"sd3_dog": 1.0})
        assert studio.schedulers == []  # DDPM samplers do not apply to a flow-matching model
        with pytest.raises(StudioError, match="`scheduler` ddim does not work with this base"):
            studio.settings("a dog", steps=2, width=64, height=64, scheduler="ddim")
    finally:
        studio.close()
