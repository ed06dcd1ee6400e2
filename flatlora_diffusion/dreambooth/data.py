"""DreamBooth data: image folders or HF datasets, prior-preservation class images, buckets, batches.

Order of use in a trainer::

    records = scan_instance_dir(args.instance_data_dir, args.instance_prompt)   # or load_hf_dataset(...)
    if prior preservation:
        generate_class_images(pipe, class_dir, class_prompt, num_class_images, ...)  # only the missing ones
        class_records = scan_image_dir(class_dir, class_prompt, flag="--class_data_dir")
    dataset = DreamBoothDataset(records, DataConfig(...), class_records)   # decodes and checks every image
    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size, seed=seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples)
    for epoch ...: sampler.set_epoch(epoch); for batch in loader: ...

All randomness (crop offsets, flips, batch order) is a pure function of (seed, epoch, index) drawn
from dedicated generators, never the global RNG: a resumed run sees the same batches. The sampler
yields ``(epoch, index)`` keys, so the dataset's draws follow the sampler's epoch even inside
DataLoader worker processes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from flatlora_diffusion.flat_lora import mix_seed

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CAPTION_SUFFIX = ".txt"
DEMO_INSTANCE_PROMPT = "a photo of sks dog"
DEMO_CLASS_PROMPT = "a photo of dog"
# diffusers' `--image_interpolation_mode` choices (torchvision's modes) as Pillow filters; torchvision
# resizes PIL images with Pillow, mapping `nearest_exact` to Pillow's NEAREST as here.
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX,
            "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS,
            "nearest": Image.Resampling.NEAREST, "nearest_exact": Image.Resampling.NEAREST}
_SKIP_HINT = "Fix or remove the file, or pass `--skip_bad_images` to skip unreadable images with a warning."


class DataError(ValueError):
    """Bad training data (missing folder, no images, unknown column, ...); the message names the flag or file."""


class ImageLoadError(DataError):
    """An image that cannot be decoded; the message names the file."""


class DataWarning(UserWarning):
    """A data problem that training works around (a skipped or upscaled image)."""


def demo_subject_dir() -> Path:
    """The bundled demo subject (5 photos of a dog from DreamBench, 128 px; see its ATTRIBUTION.md)."""
    return Path(__file__).resolve().parents[1] / "data" / "demo_subject"


# ----------------------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: transparency composited on white, 16-bit and float scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # I;16*, I (often 16-bit PNG), F
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if mode.startswith("I;16") or peak > 255:
            values = values / 257.0  # 16-bit range
        elif mode == "F" and peak <= 1.0:
            values = values * 255.0  # [0, 1] floats
        gray = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file (or its bytes) fully, apply its EXIF orientation and convert it to RGB.

    Raises :class:`ImageLoadError` naming ``name`` (default: the path) for unreadable, truncated
    or unsupported files.
    """
    name = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # decode now: truncated files fail here, not mid-training
            rgb = to_rgb(ImageOps.exif_transpose(image))
            return rgb.copy() if rgb is image else rgb
    except Exception as err:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageLoadError(f"Cannot read image `{name}`: {err}. {_SKIP_HINT}") from err


@dataclass(frozen=True)
class DatasetRow:
    """One image of a Hugging Face dataset, read lazily (the image column is stored undecoded)."""

    dataset: Any
    column: str
    row: int

    def read(self) -> str | bytes:
        """The image's bytes, or its file path."""
        value = self.dataset[self.row][self.column]
        if isinstance(value, Mapping):
            return value.get("bytes") or value["path"]
        return value


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where it is, its prompt, and its (EXIF-corrected) size once checked."""

    name: str  # for messages: the file path or `dataset[row]`
    prompt: str
    source: Path | DatasetRow
    size: tuple[int, int] | None = None  # (height, width), filled by `DreamBoothDataset`

    def load(self) -> Image.Image:
        """The decoded RGB image."""
        data = self.source.read() if isinstance(self.source, DatasetRow) else self.source
        return load_image(data, self.name)


# ----------------------------------------------------------------------------------------- sources


def scan_image_dir(path: str | os.PathLike, prompt: str, *, flag: str = "--instance_data_dir") -> list[ImageRecord]:
    """The images of a folder (not recursive, sorted by name), each with its prompt.

    ``name.txt`` beside ``name.jpg`` overrides ``prompt`` (stripped; an empty file keeps ``prompt``).
    Errors name ``flag`` and the path. Files are not decoded here: :class:`DreamBoothDataset` does it.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"`{flag}` folder `{folder}` does not exist; pass the folder holding your images.")
    if not folder.is_dir():
        raise DataError(f"`{flag}` `{folder}` is a file, not a folder; pass the folder holding your images.")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"`{flag}` folder `{folder}` holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                         "add some or point the flag at the right folder.")
    return [ImageRecord(name=str(p), prompt=_caption(p) or prompt, source=p) for p in files]


def scan_instance_dir(path: str | os.PathLike, instance_prompt: str) -> list[ImageRecord]:
    """The instance images of ``--instance_data_dir`` with their prompts (see :func:`scan_image_dir`)."""
    return scan_image_dir(path, instance_prompt, flag="--instance_data_dir")


def _caption(image_path: Path) -> str:
    caption = image_path.with_suffix(CAPTION_SUFFIX)
    return caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""


def load_hf_dataset(
    dataset_name: str,
    *,
    instance_prompt: str,
    image_column: str = "image",
    caption_column: str | None = None,
    config_name: str | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
) -> list[ImageRecord]:
    """Images (and captions) of a Hugging Face dataset: a Hub id or a local folder (``imagefolder``).

    Rows without a caption (or without ``caption_column``) get ``instance_prompt``.
    """
    try:
        import datasets
    except ImportError as err:
        raise DataError("`--dataset_name` needs the `datasets` package: `pip install datasets`.") from err
    try:
        ds = datasets.load_dataset(dataset_name, config_name, split=split, cache_dir=cache_dir)
    except (OSError, ValueError) as err:  # includes datasets' DatasetNotFoundError and FileNotFoundError
        raise DataError(f"Could not load `--dataset_name` `{dataset_name}` (split `{split}`): {err}") from err
    if not len(ds):
        raise DataError(f"`--dataset_name` `{dataset_name}` (split `{split}`) has no rows.")
    errors = [f"`{flag}` `{column}` is not a column of `{dataset_name}` (columns: {ds.column_names})."
              for flag, column in (("--image_column", image_column), ("--caption_column", caption_column))
              if column is not None and column not in ds.column_names]
    if errors:
        raise DataError(" ".join(errors))
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decoded by us: EXIF, modes, errors
    captions = ds[caption_column] if caption_column else [None] * len(ds)
    return [
        ImageRecord(name=f"{dataset_name}[{row}]", prompt=str(caption or "").strip() or instance_prompt,
                    source=DatasetRow(ds, image_column, row))
        for row, caption in enumerate(captions)
    ]


# ----------------------------------------------------------------------------------------- buckets


def default_bucket_step(resolution: int) -> int:
    """Bucket side granularity: 64 px, but at most ``resolution / 4`` (a multiple of 8).

    A step of ``resolution / 2`` or more leaves only the square bucket; ``/ 4`` gives 64 px training
    three buckets (48x80, 64x64, 80x48) and 512 px the usual 64-px grid.
    """
    return max(8, min(64, resolution // 4 // 8 * 8))


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets of area <= resolution², sides multiples of ``step``, aspect <= ``max_aspect``.

    For each width on the grid the height is the largest that keeps the area within budget; sorted
    from tall to wide. The square ``(resolution, resolution)`` is included when on the grid.
    """
    budget = resolution * resolution
    buckets = set()
    lo, hi = resolution / math.sqrt(max_aspect), resolution * math.sqrt(max_aspect)
    for width in range(step * math.ceil(lo / step), int(hi) + 1, step):
        height = budget // width // step * step
        if height >= step and max(height, width) / min(height, width) <= max_aspect + 1e-9:
            buckets.add((height, width))
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def assign_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to ``size`` = (height, width)."""
    aspect = math.log(size[1] / size[0])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - aspect))


# ----------------------------------------------------------------------------------------- dataset


@dataclass
class DataConfig:
    """How images become training tensors."""

    resolution: int = field(default=512, metadata={"help": "Training side in pixels (a multiple of 8); "
                                                            "with bucketing, the buckets' area is resolution²."})
    center_crop: bool = field(default=False, metadata={"help": "Center crop instead of a random crop."})
    random_flip: bool = field(default=False, metadata={"help": "Horizontal flip with probability ½, "
                                                                "drawn afresh every epoch."})
    repeats: int = field(default=1, metadata={"help": "Times each instance image appears per epoch."})
    enable_bucketing: bool = field(default=False, metadata={"help": "Aspect-ratio buckets instead of square crops."})
    bucket_step: int | None = field(default=None, metadata={"help": "Bucket side granularity (multiple of 8); "
                                                                     "default `default_bucket_step(resolution)`."})
    max_aspect: float = field(default=2.0, metadata={"help": "Largest bucket aspect ratio (long / short side)."})
    interpolation: str = field(default="lanczos", metadata={"help": "Resize filter, a key of `RESAMPLE`."})
    skip_bad_images: bool = field(default=False, metadata={"help": "Skip unreadable images with a warning "
                                                                    "instead of stopping."})
    seed: int = field(default=0, metadata={"help": "Seed of crops, flips and batch order."})

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.resolution, int) or self.resolution < 8 or self.resolution % 8:
            errors.append(f"`--resolution` must be a positive multiple of 8 (the VAE's factor), got {self.resolution!r}.")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            errors.append(f"`--repeats` must be an integer >= 1, got {self.repeats!r}.")
        if self.interpolation not in RESAMPLE:
            errors.append(f"`--image_interpolation_mode` must be one of {', '.join(RESAMPLE)}, got {self.interpolation!r}.")
        if not isinstance(self.max_aspect, (int, float)) or self.max_aspect < 1:
            errors.append(f"`--max_aspect` must be a number >= 1, got {self.max_aspect!r}.")
        if self.bucket_step is not None and (
            not isinstance(self.bucket_step, int) or self.bucket_step < 8 or self.bucket_step % 8
            or (isinstance(self.resolution, int) and self.bucket_step > self.resolution // 2)
        ):
            errors.append(f"`--bucket_step` must be a multiple of 8 between 8 and resolution/2, got {self.bucket_step!r}.")
        if errors:
            raise DataError("Invalid data settings:\n  " + "\n  ".join(errors))

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The (height, width) training sizes: the buckets, or the one square."""
        if not self.enable_bucketing:
            return [(self.resolution, self.resolution)]
        return make_buckets(self.resolution, self.bucket_step or default_bucket_step(self.resolution), self.max_aspect)


class DreamBoothDataset(Dataset):
    """Instance images × ``repeats``, each paired with a class image when prior preservation is on.

    Construction decodes every image once: unreadable ones raise :class:`ImageLoadError` (or are
    dropped with a warning under ``skip_bad_images``), images smaller than their training size get
    one upscaling warning. Item ``index`` is the instance example (a dict, see :meth:`example`)
    with, under prior preservation, a ``"class_example"`` of the same size. Keys may be ``index``
    (drawn with :meth:`set_epoch`'s epoch) or ``(epoch, index)`` as :class:`BucketBatchSampler` yields.
    """

    def __init__(
        self,
        instance_records: Sequence[ImageRecord],
        config: DataConfig,
        class_records: Sequence[ImageRecord] | None = None,
    ) -> None:
        self.config = config
        self.buckets = config.buckets
        self.instance = self._check(instance_records, "--instance_data_dir")
        self.classes = self._check(class_records, "--class_data_dir") if class_records else []
        self._instance_bucket = [assign_bucket(r.size, self.buckets) for r in self.instance]
        self.epoch = 0

    def _check(self, records: Sequence[ImageRecord], flag: str) -> list[ImageRecord]:
        checked = []
        for record in records:
            try:
                image = record.load()
            except ImageLoadError as err:
                if not self.config.skip_bad_images:
                    raise
                warnings.warn(f"Skipping `{record.name}`: {err.__cause__}.", DataWarning, stacklevel=3)
                continue
            size = (image.height, image.width)
            # Class images take the bucket of the instance image they are paired with: check the square.
            is_instance = flag == "--instance_data_dir"
            target = self.buckets[assign_bucket(size, self.buckets)] if is_instance else (self.config.resolution,) * 2
            if max(target[0] / size[0], target[1] / size[1]) > 1:
                warnings.warn(f"`{record.name}` is {size[1]}x{size[0]} px, smaller than the {target[1]}x{target[0]} "
                              f"training size (`--resolution` {self.config.resolution}); it is upscaled, which blurs it.",
                              DataWarning, stacklevel=3)
            checked.append(replace(record, size=size))
        if not checked:
            raise DataError(f"No readable images left in `{flag}` after skipping the bad ones.")
        return checked

    def __len__(self) -> int:
        return max(len(self.instance) * self.config.repeats, len(self.classes))

    @property
    def bucket_ids(self) -> list[int]:
        """The bucket index of every item, for :class:`BucketBatchSampler`."""
        return [self._instance_bucket[i % len(self.instance)] for i in range(len(self))]

    def prompts(self) -> list[str]:
        """Every distinct prompt (for precomputing text embeddings when the text encoder is frozen)."""
        return sorted({r.prompt for r in (*self.instance, *self.classes)})

    def set_epoch(self, epoch: int) -> None:
        """The epoch used for plain integer keys (fresh crops and flips each epoch)."""
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        position = index % len(self.instance)
        bucket = self.buckets[self._instance_bucket[position]]
        example = self.example(self.instance[position], bucket, epoch, index, is_class=False)
        if self.classes:
            record = self.classes[index % len(self.classes)]
            example["class_example"] = self.example(record, bucket, epoch, index, is_class=True)
        return example

    def example(self, record: ImageRecord, bucket: tuple[int, int], epoch: int, index: int, *, is_class: bool) -> dict:
        """Resize ``record`` to cover ``bucket`` = (height, width), crop it, maybe flip it.

        Returns ``pixel_values`` (3, H, W) in [-1, 1], ``prompt``, ``original_size`` (h, w before
        resizing), ``crop_top_left`` (top, left in the resized image, mirrored when flipped: what
        SDXL's micro-conditioning expects), ``is_class`` and ``cache_key`` (equal keys: equal pixels).
        """
        cfg = self.config
        image = record.load()
        original_size = (image.height, image.width)
        height, width = bucket
        scale = max(height / image.height, width / image.width)
        resized_h, resized_w = max(height, round(image.height * scale)), max(width, round(image.width * scale))
        image = image.resize((resized_w, resized_h), RESAMPLE[cfg.interpolation])
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, index, int(is_class)))
        if cfg.center_crop:
            top, left = (resized_h - height) // 2, (resized_w - width) // 2
        else:
            top = int(torch.randint(0, resized_h - height + 1, (1,), generator=gen))
            left = int(torch.randint(0, resized_w - width + 1, (1,), generator=gen))
        image = image.crop((left, top, left + width, top + height))
        flip = cfg.random_flip and bool(torch.randint(0, 2, (1,), generator=gen))
        if flip:
            image = ImageOps.mirror(image)
            left = resized_w - left - width
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W) in [0, 255]
        return {
            "pixel_values": pixels / 127.5 - 1.0,
            "prompt": record.prompt,
            "original_size": original_size,
            "crop_top_left": (top, left),
            "is_class": is_class,
            "cache_key": f"{record.name}|{height}x{width}|{top},{left}|{int(flip)}",
        }


def collate_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch: instance examples first, then their class examples (if any).

    ``pixel_values`` (B, 3, H, W), ``prompts`` (B strings), ``original_sizes`` and
    ``crop_top_lefts`` (B, 2) long tensors, ``is_class`` (B,) bool, ``cache_keys`` (B strings).
    Under prior preservation ``B = 2 × items`` and ``loss.chunk(2)`` splits instance from class.
    """
    flat = [*examples, *[e["class_example"] for e in examples if "class_example" in e]]
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in flat]).contiguous(),
        "prompts": [e["prompt"] for e in flat],
        "original_sizes": torch.tensor([e["original_size"] for e in flat], dtype=torch.long),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in flat], dtype=torch.long),
        "is_class": torch.tensor([e["is_class"] for e in flat], dtype=torch.bool),
        "cache_keys": [e["cache_key"] for e in flat],
    }


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys, all from one bucket, in a seeded order per epoch.

    Without bucketing every item is in bucket 0 and this is a seeded shuffling batch sampler. The
    order is a pure function of (seed, epoch): ``set_epoch(epoch, start=k)`` resumes at batch ``k``.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"`--train_batch_size` must be a positive integer, got {batch_size!r}.")
        self.bucket_ids = list(bucket_ids)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start`` (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """All batches of ``epoch``, in order."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xBA7C4))
        batches = []
        for bucket in sorted(set(self.bucket_ids)):
            members = [i for i, b in enumerate(self.bucket_ids) if b == bucket]
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append([(epoch, i) for i in chunk])
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.batches(self.epoch)[self.start:]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.start


# ----------------------------------------------------------------------------------------- class images


def count_images(folder: str | os.PathLike) -> int:
    """Image files in ``folder`` (0 if it does not exist)."""
    path = Path(folder)
    if not path.is_dir():
        return 0
    return sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def generate_class_images(
    pipe,
    class_dir: str | os.PathLike,
    class_prompt: str,
    num_class_images: int,
    *,
    sample_batch_size: int = 4,
    seed: int = 0,
    steps: int = 30,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> list[Path]:
    """Make ``class_dir`` hold at least ``num_class_images`` images, generating only the missing ones.

    Existing images are counted (any name); new image ``i`` (counting from 0 over the whole folder)
    uses seed ``seed + i``, so an interrupted run resumes with the images it would have made. Each
    is written as ``class_{i:05d}_{hash}.png`` via a temporary file as soon as its batch is done.
    Returns the new files.
    """
    from flatlora_diffusion.files import save_image
    from flatlora_diffusion.sampling import SampleSettings, generate

    if not isinstance(num_class_images, int) or num_class_images < 1:
        raise DataError(f"`--num_class_images` must be a positive integer, got {num_class_images!r}.")
    if not class_prompt:
        raise DataError("`--class_prompt` is required with `--with_prior_preservation`.")
    folder = Path(class_dir)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"`--class_data_dir` `{folder}` is a file; pass a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    existing = count_images(folder)
    written: list[Path] = []
    if existing >= num_class_images:
        return written
    logger.info("Generating %d class images for %r in %s", num_class_images - existing, class_prompt, folder)
    for start in range(existing, num_class_images, sample_batch_size):
        count = min(sample_batch_size, num_class_images - start)
        settings = SampleSettings(prompt=class_prompt, num_images=count, seed=seed + start, steps=steps,
                                  guidance_scale=guidance_scale, width=resolution, height=resolution)
        for offset, image in enumerate(generate(pipe, settings, batch_size=count)):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
            path = folder / f"class_{start + offset:05d}_{digest}.png"
            written.append(save_image(image, path, pnginfo=settings.for_image(offset).to_png_info()))
    return written
