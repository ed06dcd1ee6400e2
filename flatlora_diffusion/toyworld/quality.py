"""Scoring with the toy world's oracle: does a base model follow captions, does an adapter show its subject?

Both measurements sample through `flatlora_diffusion.sampling` (the module validation, eval and
the app use) with fixed settings, one seeded image per (prompt, seed), and read every image back
with the oracle:

* `caption_following`: held-out captions naming object, colour, pattern and scene; the fraction of
  images in which the oracle finds each named attribute (chance: 1/6 for object, colour, scene;
  1/4 for pattern).
* `subject_fidelity`: a subject's instance prompt (`a photo of sks ball`) and its DreamBench-style
  prompts (`toyworld.subjects.PROMPTS`); the fraction of images showing the subject, and for the
  scene prompts the fraction whose scene follows the prompt, alone and together with the subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from flatlora_diffusion.toyworld.oracle import Oracle
from flatlora_diffusion.toyworld.render import from_pil
from flatlora_diffusion.toyworld.subjects import PROMPTS, UNIQUE_TOKEN, Subject
from flatlora_diffusion.toyworld.world import COLOURS, OBJECTS, PATTERNS, SCENES, Scene, caption, random_scene
from flatlora_diffusion.toyworld.world import scene_of_prompt as _scene_of_prompt

HELD_OUT_SEED = 20_261_201  # differs from every pretraining pool's seed
CHANCE = {"object": 1 / len(OBJECTS), "colour": 1 / len(COLOURS), "pattern": 1 / len(PATTERNS), "scene": 1 / len(SCENES)}


@dataclass(frozen=True)
class SamplingProtocol:
    """How every toy-world measurement samples (fixed before any result was seen)."""

    steps: int = 25
    guidance_scale: float = 4.0
    scheduler: str | None = None  # None: the pipeline's own (toy:sd ships DDIM, trailing timesteps)


def held_out_scenes(count: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """`count` random pretraining-distribution scenes from a seed no training pool used."""
    generator = torch.Generator().manual_seed(seed)
    return [random_scene(generator) for _ in range(count)]


def _generate(pipe, prompts: Sequence[str], seeds: Sequence[int], protocol: SamplingProtocol,
              adapters: dict[str, float] | None) -> list[Image.Image]:
    from flatlora_diffusion.sampling import SampleSettings, generate

    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        settings = SampleSettings(prompt=prompt, seed=seed, steps=protocol.steps,
                                  guidance_scale=protocol.guidance_scale, scheduler=protocol.scheduler)
        images += generate(pipe, settings, adapters=adapters)
    return images


def _tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([from_pil(image) for image in images])


def _fraction(flags: Sequence[bool]) -> dict:
    n = len(flags)
    p = sum(flags) / n if n else float("nan")
    return {"accuracy": p, "n": n, "stderr": (p * (1 - p) / n) ** 0.5 if n else float("nan")}


def caption_following(pipe, oracle: Oracle, count: int = 240, *, seed: int = HELD_OUT_SEED,
                      protocol: SamplingProtocol = SamplingProtocol(), adapters: dict[str, float] | None = None,
                      ) -> tuple[dict, list[Image.Image], list[str]]:
    """Per-attribute accuracy of images of `count` held-out captions; also the images and captions."""
    scenes = held_out_scenes(count, seed)
    captions = [caption(scene) for scene in scenes]
    images = _generate(pipe, captions, [seed + i for i in range(count)], protocol, adapters)
    predicted = oracle.predict(_tensor(images))
    result = {name: _fraction([predicted[name][i] == getattr(scene, name) for i, scene in enumerate(scenes)])
              | {"chance": CHANCE[name]} for name in CHANCE}
    result["all_three"] = _fraction([all(predicted[k][i] == getattr(s, k) for k in ("object", "colour", "scene"))
                                     for i, s in enumerate(scenes)])
    return {"attributes": result, "captions": count, "seed": seed, "protocol": asdict(protocol)}, images, captions


@torch.no_grad()
def reconstruction_ceiling(vae, oracle: Oracle, subject: Subject, count: int = 48, seed: int = 7) -> dict:
    """How often the oracle still sees the subject after a round trip through the VAE alone.

    Every generated image is a VAE decode, so this bounds what any adapter can reach on this base:
    a pattern the VAE cannot reproduce cannot be generated either.
    """
    from flatlora_diffusion.toyworld.render import render
    from flatlora_diffusion.toyworld.world import place

    generator = torch.Generator().manual_seed(seed)
    scenes = [place(subject.scene(tuple(SCENES)[i % len(SCENES)]), generator) for i in range(count)]
    images = torch.stack([render(scene) for scene in scenes])
    param = next(vae.parameters())
    latents = vae.encode((images * 2 - 1).to(param)).latent_dist.mean
    decoded = ((vae.decode(latents).sample.float().cpu() + 1) / 2).clamp(0, 1)
    return _fraction([name == subject.name for name in oracle.predict(decoded)["subject"]])


def instance_prompt(subject: Subject) -> str:
    """The prompt a subject is trained with: `a photo of sks ball`."""
    return f"a photo of {UNIQUE_TOKEN} {subject.object}"


def subject_fidelity(pipe, oracle: Oracle, subject: Subject, *, images_per_prompt: int = 4, seed: int = 0,
                     protocol: SamplingProtocol = SamplingProtocol(), adapters: dict[str, float] | None = None,
                     ) -> tuple[dict, list[Image.Image], list[str]]:
    """Subject and scene accuracy for the instance prompt (4x `images_per_prompt` images) and the subject's
    DreamBench-style prompts (`images_per_prompt` each)."""
    prompts = [instance_prompt(subject)] + [p.format(UNIQUE_TOKEN, subject.object) for p in PROMPTS]
    counts = [4 * images_per_prompt] + [images_per_prompt] * len(PROMPTS)
    repeated = [p for p, n in zip(prompts, counts, strict=True) for _ in range(n)]
    seeds = [seed + k for n in counts for k in range(n)]
    images = _generate(pipe, repeated, seeds, protocol, adapters)
    predicted = oracle.predict(_tensor(images))
    shows = [name == subject.name for name in predicted["subject"]]
    instance = [i for i, p in enumerate(repeated) if p == prompts[0]]
    scene_rows = [i for i, p in enumerate(repeated) if i not in instance and _scene_of_prompt(p)]
    scene_ok = [predicted["scene"][i] == _scene_of_prompt(repeated[i]) for i in scene_rows]
    result = {
        "subject": subject.name,
        "instance_prompt": {"prompt": prompts[0], "subject": _fraction([shows[i] for i in instance])},
        "scene_prompts": {
            "prompts": len({repeated[i] for i in scene_rows}),
            "subject": _fraction([shows[i] for i in scene_rows]),
            "scene": _fraction(scene_ok),
            "scene_and_subject": _fraction([ok and shows[i] for ok, i in zip(scene_ok, scene_rows, strict=True)]),
        },
        "reconstruction_ceiling": reconstruction_ceiling(pipe.vae, oracle, subject),
        "images_per_prompt": images_per_prompt, "seed": seed, "protocol": asdict(protocol),
    }
    return result, images, repeated


def score_image_files(oracle: Oracle, subject: Subject, files: Sequence[str | Path], prompts: Sequence[str]) -> dict:
    """Oracle read of generated images (e.g. `python -m eval dreambench` outputs) of one subject:
    the fraction showing the subject, and, over the prompts that name a scene, the fraction in that scene."""
    images = [Image.open(f).convert("RGB") for f in files]
    predicted = oracle.predict(_tensor(images))
    shows = [name == subject.name for name in predicted["subject"]]
    scene_rows = [i for i, p in enumerate(prompts) if _scene_of_prompt(p)]
    scene_ok = [predicted["scene"][i] == _scene_of_prompt(prompts[i]) for i in scene_rows]
    return {"subject": _fraction(shows), "scene": _fraction(scene_ok),
            "scene_and_subject": _fraction([ok and shows[i] for ok, i in zip(scene_ok, scene_rows, strict=True)])}


def grid(images: Sequence[Image.Image], columns: int = 8, labels: Sequence[str] | None = None,
         scale: int = 2) -> Image.Image:
    """The images in a grid, each scaled by `scale` (nearest), with an optional small label under each."""
    width, height = images[0].width * scale, images[0].height * scale
    label_height = 24 if labels else 0
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=9) if labels else None
    for i, image in enumerate(images):
        x, y = (i % columns) * width, (i // columns) * (height + label_height)
        canvas.paste(image.resize((width, height), Image.NEAREST), (x, y))
        if labels:
            words = labels[i].removeprefix("a photo of ").split()
            half = (len(words) + 1) // 2
            for line, text in enumerate((" ".join(words[:half]), " ".join(words[half:]))):
                draw.text((x + 2, y + height + 1 + 11 * line), text, fill="black", font=font)
    return canvas
