"""The toy world itself: renderer, captions, subjects and their DreamBench layout (no trained model needed)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from flatlora_diffusion.toyworld.data import distractor_scene, scene_mix, subject_of
from flatlora_diffusion.toyworld.oracle import NO_SUBJECT
from flatlora_diffusion.toyworld.render import from_pil, render, to_pil
from flatlora_diffusion.toyworld.subjects import PROMPTS, SUBJECTS, UNIQUE_TOKEN, reference_scenes
from flatlora_diffusion.toyworld.text import UNK, build_tokenizer
from flatlora_diffusion.toyworld.world import (
    COLOURS,
    OBJECTS,
    PATTERNS,
    SCENES,
    Scene,
    caption,
    random_scene,
    scene_of_prompt,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SUBJECTS = REPO / "flatlora_diffusion/data/toy_dreambench"


def _digest(scenes) -> str:
    return hashlib.sha256(b"".join((render(s) * 255).round().to(torch.uint8).numpy().tobytes() for s in scenes)).hexdigest()


def test_world_has_the_promised_variety():
    assert len(OBJECTS) >= 6 and len(COLOURS) >= 6 and len(PATTERNS) >= 3 and len(SCENES) >= 6
    generator = torch.Generator().manual_seed(0)
    scenes = [random_scene(generator) for _ in range(600)]
    for name, options in (("object", OBJECTS), ("colour", COLOURS), ("pattern", PATTERNS), ("scene", SCENES)):
        assert {getattr(s, name) for s in scenes} == set(options)
    # Position and size vary, and the object stays inside the image.
    assert torch.tensor([s.size for s in scenes]).std() > 0.03 and torch.tensor([s.x for s in scenes]).std() > 0.1
    assert all(s.size < s.x < 1 - s.size and s.size < s.y < 1 - s.size for s in scenes)


def test_renderer_is_deterministic_across_processes():
    generator = torch.Generator().manual_seed(3)
    scenes = [random_scene(generator) for _ in range(12)] + reference_scenes(SUBJECTS[0])
    here = _digest(scenes)
    assert _digest(scenes) == here
    code = ("import sys, torch; sys.path.insert(0, 'tests');"
            "from test_toyworld_world import _digest, random_scene, reference_scenes, SUBJECTS;"
            "g = torch.Generator().manual_seed(3);"
            "print(_digest([random_scene(g) for _ in range(12)] + reference_scenes(SUBJECTS[0])))")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here


def test_scene_attributes_are_checked():
    with pytest.raises(ValueError, match="`colour` must be one of"):
        Scene("ball", "teal", "plain", "grass", 0.5, 0.5, 0.2, 0)
    with pytest.raises(ValueError, match="`object` must be one of"):
        Scene("dog", "red", "plain", "grass", 0.5, 0.5, 0.2, 0)


def test_every_attribute_changes_the_pixels():
    base = Scene("ball", "red", "plain", "grass", 0.5, 0.5, 0.25, 7)
    image = render(base)
    for change in ({"object": "box"}, {"colour": "blue"}, {"pattern": "striped"}, {"scene": "night"},
                   {"x": 0.3}, {"size": 0.2}, {"colour2": "blue", "pattern": "halves"}, {"mark": "cross"}):
        assert (render(replace(base, **change)) - image).abs().amax() > 0.3, change


def test_captions_read_like_dreambench_and_tokenize_without_unknown_words():
    scene = Scene("ball", "red", "striped", "beach", 0.5, 0.5, 0.2, 0)
    assert caption(scene) == "a photo of a red striped ball on the beach"
    assert caption(replace(scene, colour="orange", pattern="plain")) == "a photo of an orange ball on the beach"
    tokenizer = build_tokenizer()
    unk = tokenizer.convert_tokens_to_ids(UNK)
    generator = torch.Generator().manual_seed(0)
    texts = [caption(random_scene(generator), generator, drop=0.3) for _ in range(300)]
    texts += [p.format(UNIQUE_TOKEN, s.object) for s in SUBJECTS for p in PROMPTS]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert unk not in ids, text
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer("a shiny sks ball").input_ids.count(unk) == 1  # unknown words map to <|unk|>
    assert scene_of_prompt("a sks ball floating on top of water") == "water" and scene_of_prompt("a red sks ball") is None


def test_subjects_never_appear_in_pretraining_scenes():
    assert len(SUBJECTS) >= 5 and len({s.signature for s in SUBJECTS}) == len(SUBJECTS)
    assert all(subject_of(scene) == NO_SUBJECT for scene in scene_mix(3000, seed=5))
    generator = torch.Generator().manual_seed(1)
    assert all(subject_of(distractor_scene(generator)) == NO_SUBJECT for _ in range(1000))
    for subject in SUBJECTS:
        assert all(subject_of(scene) == subject.name for scene in reference_scenes(subject))


def test_shipped_subjects_match_the_renderer_and_read_as_dreambench():
    from eval.dreambench import DreamBench

    bench = DreamBench(SHIPPED_SUBJECTS)
    assert [s.name for s in bench.select(None)] == [s.name for s in SUBJECTS]
    for subject in SUBJECTS:
        entry = bench.subject(subject.name)
        assert entry.class_noun == subject.object and len(entry.prompts()) == 25
        assert 4 <= len(entry.images) <= 6
        for path, scene in zip(entry.images, reference_scenes(subject), strict=True):
            shipped = from_pil(Image.open(path))
            assert (shipped - from_pil(to_pil(render(scene)))).abs().amax() <= 1 / 255 + 1e-6, path
