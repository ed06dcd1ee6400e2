"""The sampling module: seeding, batching, adapter activation, schedulers, PNG settings, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flatlora_diffusion.adapters import load_adapter
from flatlora_diffusion.sampling import (
    SCHEDULERS,
    PipelineLoadError,
    SampleSettings,
    generate,
    load_pipeline,
    save_images,
    set_scheduler,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd_path):
    return load_pipeline(tiny_sd_path)


def test_seeds_batches_and_global_rng(sd_pipe):
    settings = SampleSettings(prompt="a photo of sks dog", num_images=3, seed=7, steps=2)
    rng_before = torch.get_rng_state()
    batched = generate(sd_pipe, settings, batch_size=3)
    assert torch.equal(rng_before, torch.get_rng_state()), "sampling must not touch the global RNG"
    assert [image.size for image in batched] == [(64, 64)] * 3
    again = generate(sd_pipe, settings, batch_size=3)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(batched, again, strict=True))
    alone = generate(sd_pipe, settings.for_image(2))[0]
    # Same starting noise; only the float rounding of batched kernels may differ.
    assert np.abs(_pixels(alone) - _pixels(batched[2])).max() <= 2
    assert np.abs(_pixels(batched[0]) - _pixels(batched[1])).max() > 20  # different seeds, different images


def test_adapter_scales_and_base(tiny_sd_path, sd_adapter_dir):
    pipe = load_pipeline(tiny_sd_path)
    settings = SampleSettings(prompt="a photo of sks dog", seed=3, steps=2)
    base = _pixels(generate(pipe, settings)[0])
    load_adapter(pipe, sd_adapter_dir, "dog")
    full = _pixels(generate(pipe, settings, adapters={"dog": 1.0})[0])
    zero = _pixels(generate(pipe, settings, adapters={"dog": 0.0})[0])
    after = _pixels(generate(pipe, settings, adapters=None)[0])
    assert np.abs(full - base).max() > 20
    assert np.array_equal(zero, base)
    assert np.array_equal(after, base)
    assert np.array_equal(_pixels(generate(pipe, settings, adapters={"dog": 1.0})[0]), full)  # re-enabled
    with pytest.raises(ValueError, match=r"\['cat'\] are not loaded"):
        generate(pipe, settings, adapters={"cat": 1.0})


def test_sdxl_sampling(tiny_sdxl_path):
    pipe = load_pipeline(tiny_sdxl_path)
    settings = SampleSettings(prompt="a photo of sks dog", negative_prompt="blurry", num_images=2, seed=0, steps=2,
                              width=64, height=64, scheduler="euler_a")
    images = generate(pipe, settings, batch_size=2)
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert np.array_equal(_pixels(images[1]), _pixels(generate(pipe, settings, batch_size=2)[1]))


def test_scheduler_of_one_call_does_not_leak_into_the_next(sd_pipe):
    settings = SampleSettings(prompt="a photo of sks dog", seed=3, steps=2, width=64, height=64)
    own = type(sd_pipe.scheduler)
    before = _pixels(generate(sd_pipe, settings)[0])
    generate(sd_pipe, SampleSettings(**(settings.to_dict() | {"scheduler": "euler_a"})))
    assert type(sd_pipe.scheduler) is own
    assert np.array_equal(_pixels(generate(sd_pipe, settings)[0]), before)


def test_schedulers_switch_without_leftovers(sd_pipe):
    prediction_type = sd_pipe.scheduler.config.prediction_type
    for name, (class_name, _) in SCHEDULERS.items():
        set_scheduler(sd_pipe, name)
        assert type(sd_pipe.scheduler).__name__ == class_name
        assert sd_pipe.scheduler.config.prediction_type == prediction_type
    set_scheduler(sd_pipe, "dpm++_karras")
    set_scheduler(sd_pipe, "dpm++")
    assert sd_pipe.scheduler.config.use_karras_sigmas is False
    with pytest.raises(ValueError, match="Unknown scheduler `heun`"):
        set_scheduler(sd_pipe, "heun")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 100}, "`width` must be a multiple of 8"),
        ({"height": 32}, r"`height` must be a multiple of 8 in \[64"),
        ({"steps": 0}, "`steps` must be an integer"),
        ({"num_images": 0}, "`num_images`"),
        ({"seed": -1}, "`seed`"),
        ({"guidance_scale": -1.0}, "`guidance_scale`"),
        ({"scheduler": "heun"}, "`scheduler` must be one of"),
    ],
)
def test_settings_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleSettings(prompt="x", **kwargs)


def test_save_images_writes_settings_chunks(tmp_path):
    settings = SampleSettings(prompt="a dog", negative_prompt="cat", num_images=2, seed=10, steps=4, scheduler="ddim")
    images = [Image.new("RGB", (64, 64), color) for color in ("red", "blue")]
    paths = save_images(images, tmp_path / "out", "val", settings, extra={"adapters": {"dog": 0.5}})
    assert [p.name for p in paths] == ["val_000.png", "val_001.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["val_000.png", "val_001.png"]  # no temp files
    with Image.open(paths[1]) as png:
        text = png.text
        assert png.getpixel((0, 0)) == (0, 0, 255)
    assert text["parameters"].splitlines()[1] == "Negative prompt: cat"
    assert "Seed: 11" in text["parameters"] and "Sampler: ddim" in text["parameters"]
    data = json.loads(text["flatlora"])
    assert data["settings"]["seed"] == 11 and data["settings"]["num_images"] == 1
    assert data["adapters"] == {"dog": 0.5}


def test_load_pipeline_errors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(PipelineLoadError, match="single file"):
        load_pipeline(tmp_path / "model.safetensors")
    with pytest.raises(PipelineLoadError, match="`model_index.json` is missing"):
        load_pipeline(tmp_path)
