"""The toy world's vocabulary: what a scene is made of, how scenes are drawn at random, and their captions.

A scene is one object (a class noun, a colour, a surface pattern, a position and a size) in front
of one of six backgrounds. Captions follow the DreamBooth/DreamBench style::

    a photo of a red striped ball on the beach
    an orange cone in the snow
    a purple dotted kite

Everything random here is drawn from a `torch.Generator` the caller seeds, so a seed fixes a scene.
Two appearance features exist only for the DreamBooth subjects (`toyworld.subjects`) and never in
the base model's pretraining: a second, different hue for the pattern (pretraining patterns use a
light tint of the object's own colour) and a white mark on the object.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

OBJECTS = ("ball", "box", "cup", "cone", "kite", "bottle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.87, 0.10),
    "green": (0.12, 0.68, 0.20),
    "blue": (0.10, 0.28, 0.92),
    "purple": (0.56, 0.16, 0.76),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
# Patterns and marks that only subjects carry (never seen by the base model).
SUBJECT_PATTERNS = ("halves",)
MARKS = ("none", "cross", "disc")
# scene -> the phrases a caption or prompt may use for it (the first is the canonical one).
SCENES: dict[str, tuple[str, ...]] = {
    "grass": ("on the grass", "on a lawn", "in a field of grass"),
    "beach": ("on the beach", "on the sand", "by the sea"),
    "snow": ("in the snow", "on the snow", "in a snowy field"),
    "night": ("at night", "under the night sky", "under the stars"),
    "brick": ("in front of a brick wall", "by a brick wall", "with a brick wall in the background"),
    "water": ("on the water", "floating on top of water", "floating in a lake"),
}
PREFIXES = ("a photo of", "a picture of", "")
# Rare identifiers for DreamBooth (in the vocabulary, never in a pretraining caption).
IDENTIFIERS = ("sks", "zwx", "ohwx", "qwe")

IMAGE_SIZE = 64


@dataclass(frozen=True)
class Scene:
    """Everything the renderer needs to draw one image; `seed` fixes the background's texture."""

    object: str
    colour: str
    pattern: str
    scene: str
    x: float  # object centre, in [0, 1] of the image width
    y: float
    size: float  # half-extent of the object, as a fraction of the image side
    seed: int
    colour2: str | None = None  # second hue of the pattern; None: a light tint of `colour`
    mark: str = "none"

    def __post_init__(self) -> None:
        checks = (("object", self.object, OBJECTS), ("colour", self.colour, tuple(COLOURS)),
                  ("pattern", self.pattern, PATTERNS + SUBJECT_PATTERNS), ("scene", self.scene, tuple(SCENES)),
                  ("mark", self.mark, MARKS))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"Scene `{name}` must be one of {', '.join(allowed)}; got {value!r}.")
        if self.colour2 is not None and self.colour2 not in COLOURS:
            raise ValueError(f"Scene `colour2` must be None or one of {', '.join(COLOURS)}; got {self.colour2!r}.")


def _choice(options, generator: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def place(scene: Scene, generator: torch.Generator) -> Scene:
    """`scene` with a random size and a position that keeps the whole object inside the image."""
    size = _uniform(0.17, 0.30, generator)
    margin = size + 2.5 / IMAGE_SIZE
    return replace(scene, size=size, x=_uniform(margin, 1 - margin, generator),
                   y=_uniform(margin, 1 - margin, generator), seed=int(torch.randint(2**31 - 1, (1,), generator=generator)))


def random_scene(generator: torch.Generator) -> Scene:
    """A pretraining scene: every object, colour, pattern and scene equally likely; no subject features."""
    base = Scene(_choice(OBJECTS, generator), _choice(tuple(COLOURS), generator), _choice(PATTERNS, generator),
                 _choice(tuple(SCENES), generator), 0.5, 0.5, 0.2, 0)
    return place(base, generator)


def article(word: str) -> str:
    """`a` or `an` before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, generator: torch.Generator | None = None, *, drop: float = 0.0) -> str:
    """A DreamBench-style caption of a pretraining scene.

    With a `generator`, the prefix and scene phrase vary and each of colour, pattern and scene is
    left out with probability `drop` (so the model also learns prompts that name fewer attributes);
    without one, the canonical full caption.
    """
    def keep() -> bool:
        return generator is None or float(torch.rand((), generator=generator)) >= drop

    words = []
    if keep():
        words.append(scene.colour)
    if scene.pattern != "plain" and keep():
        words.append(scene.pattern)
    words.append(scene.object)
    prefix = "a photo of" if generator is None else _choice(PREFIXES, generator)
    text = f"{prefix} {article(words[0])} {' '.join(words)}".strip()
    if keep():
        phrases = SCENES[scene.scene]
        text += " " + (phrases[0] if generator is None else _choice(phrases, generator))
    return text


def vocabulary() -> list[str]:
    """Every word a caption or a toy DreamBench prompt can contain, sorted."""
    words = {"a", "an", "of", "the", "photo", "picture", *OBJECTS, *COLOURS, *PATTERNS, *IDENTIFIERS}
    for phrases in SCENES.values():
        for phrase in phrases:
            words.update(phrase.split())
    return sorted(words)


def scene_of_prompt(prompt: str) -> str | None:
    """The scene a prompt asks for (by its phrase), or None."""
    text = f" {prompt.lower()} "
    for scene, phrases in SCENES.items():
        if any(f" {phrase} " in text for phrase in phrases):
            return scene
    return None
