"""The ground-truth judge of the toy world: a small CNN that reads a 64x64 image back into attributes.

It predicts the object class, colour, pattern and scene, and which subject (if any) the image
shows. It is trained on renders (`python -m flatlora_diffusion.toyworld pretrain`) with blur, noise
and colour jitter so that it also reads generated images, and it is never used for training
anything else: it only scores. Usage::

    oracle = load_oracle("toy:oracle")
    predictions = oracle.predict(images)      # images: (B, 3, 64, 64) in [0, 1]
    predictions["scene"]                     # list of scene names
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flatlora_diffusion.toyworld.subjects import SUBJECTS
from flatlora_diffusion.toyworld.world import COLOURS, IMAGE_SIZE, OBJECTS, PATTERNS, SCENES, SUBJECT_PATTERNS

NO_SUBJECT = "none"
HEADS: dict[str, tuple[str, ...]] = {
    "object": OBJECTS,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS + SUBJECT_PATTERNS,
    "scene": tuple(SCENES),
    "subject": (NO_SUBJECT, *(subject.name for subject in SUBJECTS)),
}
WEIGHTS_FILE, CONFIG_FILE = "oracle.safetensors", "config.json"


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class Oracle(nn.Module):
    """CNN with one linear head per attribute; `forward` gives logits per head."""

    def __init__(self, width: int = 32, heads: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__()
        self.heads = dict(heads or HEADS)
        self.width = width
        w = width
        self.features = nn.Sequential(_block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
                                      _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1))
        self.classifiers = nn.ModuleDict({name: nn.Linear(8 * w, len(labels)) for name, labels in self.heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images (B, 3, 64, 64) in [0, 1]."""
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        x = self.features(images * 2 - 1)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.classifiers.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Predicted label names per head."""
        self.eval()
        out: dict[str, list[str]] = {name: [] for name in self.heads}
        for start in range(0, len(images), batch_size):
            logits = self(images[start:start + batch_size].float())
            for name, values in logits.items():
                out[name] += [self.heads[name][i] for i in values.argmax(dim=1).tolist()]
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write `oracle.safetensors` and `config.json` to `out_dir`."""
        from safetensors.torch import save

        from flatlora_diffusion.files import atomic_open, write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        with atomic_open(out / WEIGHTS_FILE, "wb") as handle:
            handle.write(save(state))
        write_text(out / CONFIG_FILE, json.dumps({"width": self.width, "heads": self.heads}, indent=2) + "\n")
        return out


def load_oracle(path: str | Path) -> Oracle:
    """The oracle saved in folder `path` (or `toy:oracle`)."""
    from safetensors.torch import load_file

    from flatlora_diffusion.toyworld.registry import resolve_toy

    folder = Path(resolve_toy(str(path)) if str(path).startswith("toy:") else path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    oracle = Oracle(config["width"], {k: tuple(v) for k, v in config["heads"].items()})
    oracle.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return oracle.eval()
