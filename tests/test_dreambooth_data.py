"""DreamBooth data: image decoding, folders and captions, crops/flips, buckets, batches, class images."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flatlora_diffusion.dreambooth.data import (
    DEMO_INSTANCE_PROMPT,
    RESAMPLE,
    BucketBatchSampler,
    DataConfig,
    DataError,
    DataWarning,
    DreamBoothDataset,
    ImageLoadError,
    assign_bucket,
    collate_examples,
    count_images,
    default_bucket_step,
    demo_subject_dir,
    generate_class_images,
    load_hf_dataset,
    load_image,
    make_buckets,
    scan_image_dir,
    scan_instance_dir,
)

PROMPT = "a photo of sks dog"


def _save(path, size=(80, 64), color=(200, 30, 30), **kwargs):
    Image.new("RGB", size, color).save(path, **kwargs)
    return path


def _folder(tmp_path, sizes, name="inst"):
    folder = tmp_path / name
    folder.mkdir()
    for i, size in enumerate(sizes):
        array = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"{i:02d}.png")
    return folder


def _dataset(folder, class_folder=None, **config):
    records = scan_instance_dir(folder, PROMPT)
    classes = scan_image_dir(class_folder, "a photo of dog", flag="--class_data_dir") if class_folder else None
    return DreamBoothDataset(records, DataConfig(**{"resolution": 64, **config}), classes)


# ----------------------------------------------------------------------------------------- decoding


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[5, 10], np.asarray(loaded)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200  # red on top, blue below


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 255)), (255, 0, 0)),
        (lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
        (lambda: _palette(transparent=True), (255, 255, 255)),
        (lambda: _palette(transparent=False), (0, 255, 0)),
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("L", (8, 8), 128), (128, 128, 128)),
        (lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), (255, 255, 255)),  # I;16
        (lambda: Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)), (128, 128, 128)),  # F in [0, 1]
    ],
)
def test_every_mode_becomes_rgb(tmp_path, make, expected):
    image = make()
    path = tmp_path / ("x.tiff" if image.mode in ("CMYK", "F") else "x.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.getpixel((3, 3)) == expected


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1
    return image


def test_truncated_image_is_named_or_skipped(tmp_path):
    folder = _folder(tmp_path, [(64, 64)])
    _save(folder / "bad.jpg", size=(64, 64), quality=95)
    data = (folder / "bad.jpg").read_bytes()
    (folder / "bad.jpg").write_bytes(data[: len(data) // 2])
    (folder / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match=r"`.*bad\.jpg`.*`--skip_bad_images`"):
        _dataset(folder)
    with pytest.warns(DataWarning, match="Skipping") as caught:
        dataset = _dataset(folder, skip_bad_images=True)
    assert sorted(str(w.message).split("`")[1].rsplit("/", 1)[1] for w in caught) == ["bad.jpg", "junk.png"]
    assert [r.name.rsplit("/", 1)[1] for r in dataset.instance] == ["00.png"]
    (folder / "00.png").unlink()
    with pytest.raises(DataError, match="No readable images left in `--instance_data_dir`"), pytest.warns(DataWarning):
        _dataset(folder, skip_bad_images=True)


def test_small_images_are_upscaled_with_one_warning_each(tmp_path):
    folder = _folder(tmp_path, [(32, 40), (100, 100)])
    with pytest.warns(DataWarning, match=r"00\.png` is 32x40 px, smaller than the 64x64") as caught:
        dataset = _dataset(folder)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(2):
            dataset.set_epoch(epoch)
            assert dataset[0]["pixel_values"].shape == (3, 64, 64)


# ----------------------------------------------------------------------------------------- folders


def test_folder_errors_name_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"`--instance_data_dir` folder `.*missing` does not exist"):
        scan_instance_dir(tmp_path / "missing", PROMPT)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="`--instance_data_dir` `.*file.jpg` is a file"):
        scan_instance_dir(tmp_path / "file.jpg", PROMPT)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="`--class_data_dir` folder `.*empty` holds no images"):
        scan_image_dir(tmp_path / "empty", "a dog", flag="--class_data_dir")


def test_captions_override_the_instance_prompt(tmp_path):
    folder = _folder(tmp_path, [(64, 64)] * 3)
    (folder / "00.txt").write_text("  a sks dog on a beach \n")
    (folder / "01.txt").write_text("   ")
    (folder / ".hidden.png").write_bytes(b"x")
    records = scan_instance_dir(folder, PROMPT)
    assert [r.prompt for r in records] == ["a sks dog on a beach", PROMPT, PROMPT]
    assert _dataset(folder).prompts() == sorted(["a sks dog on a beach", PROMPT])


def test_hf_imagefolder_with_captions(tmp_path):
    folder = _folder(tmp_path, [(64, 64), (64, 96)], name="hf")
    lines = [{"file_name": "00.png", "text": "a sks dog"}, {"file_name": "01.png", "text": ""}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    records = load_hf_dataset(str(folder), instance_prompt=PROMPT, caption_column="text", cache_dir=tmp_path / "c")
    assert sorted(r.prompt for r in records) == sorted(["a sks dog", PROMPT])
    assert sorted(r.load().size for r in records) == [(64, 64), (64, 96)]
    with pytest.raises(DataError, match=r"`--caption_column` `caption` is not a column"):
        load_hf_dataset(str(folder), instance_prompt=PROMPT, caption_column="caption", cache_dir=tmp_path / "c")


def test_demo_subject_is_bundled():
    folder = demo_subject_dir()
    records = scan_instance_dir(folder, DEMO_INSTANCE_PROMPT)
    assert len(records) == 5 and all(min(r.load().size) == 128 for r in records)
    assert "CC BY 4.0" in (folder / "ATTRIBUTION.md").read_text()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 200_000


# ----------------------------------------------------------------------------------------- items


def test_config_errors_are_reported_together():
    with pytest.raises(DataError, match=r"(?s)`--resolution`.*`--repeats`.*`--bucket_step`"):
        DataConfig(resolution=60, repeats=0, bucket_step=12)


def test_crops_and_flips_are_a_function_of_seed_epoch_index(tmp_path):
    folder = _folder(tmp_path, [(96, 80), (80, 120), (64, 64)])
    first, second = (_dataset(folder, random_flip=True, seed=3) for _ in range(2))
    rng_before = torch.get_rng_state()
    for key in [(0, 0), (0, 1), (1, 0), (5, 2)]:
        a, b = first[key], second[key]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["cache_key"] == b["cache_key"]
    assert torch.equal(rng_before, torch.get_rng_state()), "the dataset must not use the global RNG"
    first.set_epoch(5)
    assert torch.equal(first[2]["pixel_values"], second[(5, 2)]["pixel_values"])
    flips = {tuple(first[(epoch, i)]["cache_key"].endswith("|1") for i in range(3)) for epoch in range(8)}
    assert len(flips) > 1, "flips must be redrawn every epoch"
    other_seed = _dataset(folder, random_flip=True, seed=4)
    assert any(first[(0, i)]["cache_key"] != other_seed[(0, i)]["cache_key"] for i in range(3))
    item = first[(0, 0)]["pixel_values"]
    assert item.shape == (3, 64, 64) and item.min() >= -1 and item.max() <= 1


def test_every_interpolation_mode_resizes_with_its_own_filter(tmp_path):
    """diffusers' `--image_interpolation_mode` choices; `nearest_exact` is Pillow's NEAREST, as torchvision on PIL."""
    folder = _folder(tmp_path, [(96, 80)])
    pixels = {mode: _dataset(folder, center_crop=True, interpolation=mode)[(0, 0)]["pixel_values"] for mode in RESAMPLE}
    assert torch.equal(pixels.pop("nearest_exact"), pixels["nearest"])
    assert len({tuple(p.flatten().tolist()) for p in pixels.values()}) == len(pixels) == 6
    with pytest.raises(DataError, match=r"`--image_interpolation_mode` must be one of bicubic, bilinear"):
        DataConfig(interpolation="cubic")


def test_center_crop_and_flip_coordinates(tmp_path):
    folder = _folder(tmp_path, [(200, 100)])  # width 200, height 100
    example = _dataset(folder, center_crop=True)[0]
    # Shorter side 100 -> 64: resized to 128x64, the centered 64x64 crop starts at left 32.
    assert example["original_size"] == (100, 200) and example["crop_top_left"] == (0, 32)
    resized = np.asarray(Image.open(folder / "00.png").resize((128, 64), Image.Resampling.LANCZOS), dtype=np.float32)
    flipped = _dataset(folder, random_flip=True, seed=0)
    seen = set()
    for epoch in range(8):
        ex = flipped[(epoch, 0)]
        top, left = ex["crop_top_left"]
        is_flipped = ex["cache_key"].endswith("|1")
        seen.add(is_flipped)
        # A flipped item reports its crop in the mirrored image, as SDXL's micro-conditioning expects.
        crop = resized[:, 128 - left - 64:128 - left][:, ::-1] if is_flipped else resized[:, left:left + 64]
        pixels = (ex["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5
        assert top == 0 and np.abs(pixels - crop).max() < 1e-3
    assert seen == {True, False}


def test_buckets():
    assert default_bucket_step(64) == 16 and default_bucket_step(1024) == 64
    assert make_buckets(64, 16) == [(80, 48), (64, 64), (48, 80)]
    buckets = make_buckets(1024, 64)
    assert (1024, 1024) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and max(h, w) / min(h, w) <= 2 for h, w in buckets)
    assert buckets[assign_bucket((600, 1200), buckets)] == (704, 1408)
    assert make_buckets(64, 32) == [(64, 64)]  # why the default step is resolution / 4


def test_bucketed_items_use_the_real_crop(tmp_path):
    folder = _folder(tmp_path, [(200, 100), (100, 200), (90, 90), (210, 100)])
    dataset = _dataset(folder, enable_bucketing=True, center_crop=True)
    assert dataset.bucket_ids == [2, 0, 1, 2]
    wide = dataset[0]
    # bucket 48x80 (h x w): scale max(48/100, 80/200) = 0.48 -> 96x48, centered crop at left 8
    assert wide["pixel_values"].shape == (3, 48, 80)
    assert wide["original_size"] == (100, 200) and wide["crop_top_left"] == (0, 8)
    assert dataset[1]["pixel_values"].shape == (3, 80, 48)


def test_prior_preservation_batches_put_instances_first(tmp_path):
    dataset = _dataset(_folder(tmp_path, [(64, 64)] * 2), class_folder=_folder(tmp_path, [(64, 64)] * 3, "cls"),
                       repeats=2)
    assert len(dataset) == 4
    batch = collate_examples([dataset[0], dataset[1], dataset[3]])
    assert batch["pixel_values"].shape == (6, 3, 64, 64)
    assert batch["is_class"].tolist() == [False] * 3 + [True] * 3
    assert batch["prompts"] == [PROMPT] * 3 + ["a photo of dog"] * 3
    assert batch["original_sizes"].shape == (6, 2) and batch["crop_top_lefts"].dtype == torch.long


def test_bucket_batch_sampler_is_deterministic_and_resumable():
    bucket_ids = [0, 1, 0, 2, 1, 0, 0, 1, 2, 0]
    sampler = BucketBatchSampler(bucket_ids, batch_size=2, seed=1)
    epoch0 = sampler.batches(0)
    assert epoch0 == BucketBatchSampler(bucket_ids, batch_size=2, seed=1).batches(0)
    assert epoch0 != sampler.batches(1)
    assert sorted(i for batch in epoch0 for _, i in batch) == list(range(10))
    assert all(len({bucket_ids[i] for _, i in batch}) == 1 and {e for e, _ in batch} == {0} for batch in epoch0)
    sampler.set_epoch(1, start=2)
    assert list(sampler) == sampler.batches(1)[2:] and len(sampler) == len(sampler.batches(1)) - 2
    dropping = BucketBatchSampler(bucket_ids, batch_size=2, seed=1, drop_last=True)
    assert all(len(batch) == 2 for batch in dropping.batches(0)) and len(dropping.batches(0)) == 4


def test_dataloader_runs_with_the_sampler(tmp_path):
    dataset = _dataset(_folder(tmp_path, [(200, 100), (100, 200), (90, 90)]), enable_bucketing=True, random_flip=True)
    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples)
    shapes = sorted(tuple(batch["pixel_values"].shape) for batch in loader)
    assert shapes == [(1, 3, 48, 80), (1, 3, 64, 64), (1, 3, 80, 48)]


# ----------------------------------------------------------------------------------------- class images


@pytest.mark.usefixtures("single_thread")
def test_class_images_are_resumable(tiny_sd_path, tmp_path):
    from flatlora_diffusion.sampling import load_pipeline

    pipe = load_pipeline(tiny_sd_path)
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    _save(class_dir / "mine.jpg")
    kwargs = {"sample_batch_size": 2, "seed": 5, "steps": 2}
    new = generate_class_images(pipe, class_dir, "a photo of dog", 4, **kwargs)
    assert [p.name[:11] for p in new] == ["class_00001", "class_00002", "class_00003"]
    assert count_images(class_dir) == 4 and not [p for p in class_dir.iterdir() if p.name.startswith(".")]
    assert generate_class_images(pipe, class_dir, "a photo of dog", 4, **kwargs) == []
    new[-1].unlink()  # an interrupted run: the missing image is made again, identical
    assert generate_class_images(pipe, class_dir, "a photo of dog", 4, **kwargs) == [new[-1]]
    with Image.open(new[-1]) as png:
        assert "Seed: 8" in png.text["parameters"]
    with pytest.raises(DataError, match="`--num_class_images`"):
        generate_class_images(pipe, class_dir, "a photo of dog", 0)
