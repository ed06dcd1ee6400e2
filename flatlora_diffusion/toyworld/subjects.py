"""The DreamBooth subjects of the toy world: object instances the base model never saw in pretraining.

Each subject carries a feature no pretraining scene has: a pattern in a second, different hue, the
`halves` pattern, or a white mark. `write_subjects` lays them out like the DreamBench dataset
(`../shared/data/dreambench/`): a folder of reference images per subject and a
`prompts_and_classes.txt` with the class noun of each subject and 25 prompts, so `python -m eval
dreambench` runs on it unchanged::

    python -m flatlora_diffusion.toyworld subjects OUT_DIR
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flatlora_diffusion.files import save_image, write_text
from flatlora_diffusion.toyworld.render import render, to_pil
from flatlora_diffusion.toyworld.world import SCENES, Scene, place


@dataclass(frozen=True)
class Subject:
    """One subject: its appearance and the scenes its reference photos are taken in."""

    name: str
    object: str
    colour: str
    pattern: str
    colour2: str | None
    mark: str
    reference_scenes: tuple[str, ...]

    def scene(self, scene: str, x: float = 0.5, y: float = 0.5, size: float = 0.25, seed: int = 0) -> Scene:
        """The subject drawn in `scene`."""
        return Scene(self.object, self.colour, self.pattern, scene, x, y, size, seed, self.colour2, self.mark)

    @property
    def signature(self) -> tuple:
        """What identifies the subject: everything but the scene, position and size."""
        return (self.object, self.colour, self.pattern, self.colour2, self.mark)


SUBJECTS = (
    Subject("redblue_ball", "ball", "red", "halves", "blue", "none", ("grass", "brick", "snow")),
    Subject("cross_box", "box", "purple", "plain", None, "cross", ("beach", "night", "grass")),
    Subject("bluestripe_cone", "cone", "orange", "striped", "blue", "none", ("snow", "water", "brick")),
    Subject("redcheck_kite", "kite", "yellow", "checkered", "red", "none", ("night", "grass", "beach")),
    Subject("orangedot_cup", "cup", "blue", "dotted", "orange", "none", ("brick", "beach", "water")),
    Subject("disc_bottle", "bottle", "red", "plain", None, "disc", ("water", "snow", "night")),
)
SUBJECTS_BY_NAME = {subject.name: subject for subject in SUBJECTS}
REFERENCE_IMAGES = 5
UNIQUE_TOKEN = "sks"

# 20 recontextualisation prompts (each scene by its three phrases, two with the photo prefix) and
# 5 property prompts, in the form of DreamBench's: `{0}` is the identifier, `{1}` the class noun.
PROMPTS = tuple(
    [f"a {{0}} {{1}} {phrase}" for phrases in SCENES.values() for phrase in phrases]
    + ["a photo of a {0} {1} on the beach", "a photo of a {0} {1} in the snow"]
    + ["a red {0} {1}", "a purple {0} {1}", "a yellow {0} {1}", "a striped {0} {1}", "a checkered {0} {1}"]
)


def reference_scenes(subject: Subject, count: int = REFERENCE_IMAGES) -> list[Scene]:
    """The subject's reference photos: cycling through its scenes, placed at random (seeded by name)."""
    generator = torch.Generator().manual_seed(sum(ord(c) * 31**i for i, c in enumerate(subject.name)) % 2**31)
    scenes = subject.reference_scenes
    return [place(subject.scene(scenes[i % len(scenes)]), generator) for i in range(count)]


def prompts_file_text(subjects=SUBJECTS) -> str:
    """`prompts_and_classes.txt` in DreamBench's layout: the classes table, then the object and live-subject
    prompt lists (the same 25 prompts: every toy subject is an object, so the live list is never used)."""
    lines = ["Classes", "", "subject_name,class", *[f"{s.name},{s.object}" for s in subjects], "", "Prompts"]
    for title in ("Object Prompts", "Live Subject Prompts"):
        lines += ["", title, "", "prompt_list = ["]
        lines += [f"'{prompt}'.format(unique_token, class_token)," for prompt in PROMPTS]
        lines[-1] = lines[-1].rstrip(",")
        lines += ["]"]
    return "\n".join(lines) + "\n"


def write_subjects(out_dir: str | Path, subjects=SUBJECTS) -> Path:
    """Write the subjects' reference images (`images/NAME/00.png`, ...) and `prompts_and_classes.txt`."""
    out = Path(out_dir)
    for subject in subjects:
        for index, scene in enumerate(reference_scenes(subject)):
            save_image(to_pil(render(scene)), out / "images" / subject.name / f"{index:02d}.png")
    write_text(out / "prompts_and_classes.txt", prompts_file_text(subjects))
    write_text(out / "README.md", "# Toy-world DreamBooth subjects\n\nRendered by the project's procedural world "
               "(`python -m flatlora_diffusion.toyworld subjects DIR`); no third-party content.\n")
    return out
