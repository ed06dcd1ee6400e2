"""Training data of the toy models: seeded pools of rendered scenes, their labels, and augmentation.

Three kinds of scene:

* pretraining scenes (`world.random_scene`): what the SD base and CLIP learn from;
* distractors: random objects with a subject-only feature (a second hue or a mark) that match no
  subject, so the judges learn what makes a subject a subject;
* subject scenes: the subjects in any scene, seen only by the oracle (it must recognise them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from flatlora_diffusion.toyworld.oracle import HEADS, NO_SUBJECT
from flatlora_diffusion.toyworld.render import render
from flatlora_diffusion.toyworld.subjects import SUBJECTS
from flatlora_diffusion.toyworld.world import COLOURS, MARKS, PATTERNS, SCENES, Scene, place, random_scene

_SIGNATURES = {subject.signature: subject.name for subject in SUBJECTS}


def subject_of(scene: Scene) -> str:
    """The subject a scene shows, or `oracle.NO_SUBJECT`."""
    return _SIGNATURES.get((scene.object, scene.colour, scene.pattern, scene.colour2, scene.mark), NO_SUBJECT)


def distractor_scene(generator: torch.Generator) -> Scene:
    """A random object with a second hue and/or a mark, never equal to a subject."""
    while True:
        scene = random_scene(generator)
        kind = int(torch.randint(3, (1,), generator=generator))
        hues = [c for c in COLOURS if c != scene.colour]
        colour2 = hues[int(torch.randint(len(hues), (1,), generator=generator))]
        patterns = (*PATTERNS[1:], "halves")
        pattern = patterns[int(torch.randint(len(patterns), (1,), generator=generator))]
        mark = MARKS[1 + int(torch.randint(len(MARKS) - 1, (1,), generator=generator))]
        if kind == 0:
            scene = replace(scene, pattern=pattern, colour2=colour2)
        elif kind == 1:
            scene = replace(scene, mark=mark)
        else:
            scene = replace(scene, pattern=pattern, colour2=colour2, mark=mark)
        if subject_of(scene) == NO_SUBJECT:
            return scene


def subject_scene(generator: torch.Generator) -> Scene:
    """A random subject in a random scene, placed at random."""
    subject = SUBJECTS[int(torch.randint(len(SUBJECTS), (1,), generator=generator))]
    scenes = tuple(SCENES)
    return place(subject.scene(scenes[int(torch.randint(len(scenes), (1,), generator=generator))]), generator)


def scene_mix(count: int, seed: int, *, distractors: float = 0.0, subjects: float = 0.0) -> list[Scene]:
    """`count` scenes: the given fractions of distractors and subject scenes, the rest pretraining scenes."""
    generator = torch.Generator().manual_seed(seed)
    scenes = []
    for _ in range(count):
        draw = float(torch.rand((), generator=generator))
        if draw < subjects:
            scenes.append(subject_scene(generator))
        elif draw < subjects + distractors:
            scenes.append(distractor_scene(generator))
        else:
            scenes.append(random_scene(generator))
    return scenes


@dataclass
class ScenePool:
    """Rendered scenes held as uint8 (N, 3, 64, 64), with the scenes that made them."""

    scenes: list[Scene]
    pixels: torch.Tensor

    @classmethod
    def render(cls, scenes: list[Scene]) -> ScenePool:
        pixels = torch.empty(len(scenes), 3, 64, 64, dtype=torch.uint8)
        for i, scene in enumerate(scenes):
            pixels[i] = (render(scene) * 255).round().to(torch.uint8)
        return cls(scenes, pixels)

    def images(self, index: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] for the given indices."""
        return self.pixels[index].float() / 255

    def labels(self, index: torch.Tensor, heads=HEADS) -> dict[str, torch.Tensor]:
        """Oracle-head label ids for the given indices."""
        out = {}
        for name, options in heads.items():
            values = [subject_of(self.scenes[i]) if name == "subject" else getattr(self.scenes[i], name)
                      for i in index.tolist()]
            out[name] = torch.tensor([options.index(v) for v in values])
        return out


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image Gaussian blur (sigma 0-1.2 px), brightness/contrast jitter and pixel noise, so a judge
    trained on clean renders also reads decoded, slightly blurry generated images."""
    out = torch.empty_like(images)
    radius = torch.arange(-2, 3, dtype=torch.float32)
    for i, image in enumerate(images):
        sigma = 1.2 * float(torch.rand((), generator=generator))
        if sigma > 0.15:
            kernel = torch.exp(-(radius**2) / (2 * sigma**2))
            kernel = kernel / kernel.sum()
            x = F.pad(image.unsqueeze(0), (2, 2, 2, 2), mode="replicate")
            x = F.conv2d(x, kernel.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
            image = F.conv2d(x, kernel.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)[0]
        gain = 0.9 + 0.2 * float(torch.rand((), generator=generator))
        offset = 0.06 * (float(torch.rand((), generator=generator)) - 0.5)
        noise = torch.randn(image.shape, generator=generator) * 0.03 * float(torch.rand((), generator=generator))
        out[i] = (image * gain + offset + noise).clamp(0, 1)
    return out
