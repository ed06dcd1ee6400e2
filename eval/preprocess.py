"""Image preprocessing of the reference DINO and CLIP evaluations, in Pillow + torch.

Both pipelines reproduce torchvision's PIL code path exactly (``Resize(int)`` on the shorter
side, ``CenterCrop``, ``ToTensor``, ``Normalize``) without depending on torchvision:

* DINO: shorter side to 256 (bicubic) → centre crop 224 → ImageNet mean/std. This is the
  DINO/DreamBooth evaluation pipeline, *not* the transformers ``ViTImageProcessor`` default (a
  plain 224×224 bilinear resize that distorts non-square images).
* CLIP: shorter side to 224 (bicubic) → centre crop 224 → CLIP mean/std, as OpenAI's ``clip``.

For models with another input size the crop follows the model and DINO keeps the 256/224 ratio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre-crop `crop`×`crop`, scale to [0, 1], normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"`interpolation` must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}.")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"Need 0 < `crop` <= `resize`, got crop={self.crop}, resize={self.resize}.")

    def to_dict(self) -> dict:
        """JSON-ready description, recorded in every report."""
        return asdict(self)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One RGB image → a normalised (3, crop, crop) float32 tensor."""
        image = center_crop(resize_shorter(image.convert("RGB"), self.resize, self.interpolation), self.crop)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """A list of images → (N, 3, crop, crop)."""
        return torch.stack([self(image) for image in images])


def resize_shorter(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio (torchvision's rounding)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, _RESAMPLE[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central `size`×`size` square (torchvision's offsets); the image must be large enough."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"Cannot centre-crop {size}x{size} from a {width}x{height} image; resize it first.")
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def dino_preprocess(image_size: int = 224) -> Preprocess:
    """The DINO evaluation pipeline for a model with `image_size` inputs (256 → 224 for ViT-S/16)."""
    return Preprocess(resize=round(image_size * 256 / 224), crop=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def clip_preprocess(image_size: int = 224) -> Preprocess:
    """OpenAI CLIP's pipeline for a model with `image_size` inputs."""
    return Preprocess(resize=image_size, crop=image_size, mean=CLIP_MEAN, std=CLIP_STD)
