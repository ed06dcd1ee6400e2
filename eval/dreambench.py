"""The DreamBench dataset: subjects, class nouns, live vs object, and the 25 prompts of each subject.

Parsed from the dataset's own ``prompts_and_classes.txt`` (a CSV of subject → class and two
Python-style prompt lists), so the prompts are exactly the published ones::

    bench = DreamBench("data/dreambench")
    dog = bench.subject("dog")           # Subject(name='dog', class_noun='dog', live=True, ...)
    dog.prompts("sks")[0]                # 'a sks dog in the jungle'
    remove_identifier(_, "sks")          # 'a dog in the jungle'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from eval.errors import EvalError
from eval.images import IMAGE_SUFFIXES, natural_key

PROMPTS_FILE = "prompts_and_classes.txt"
# The paper's "live subjects" (9 of 30) are its dogs and cats; the file itself does not mark them.
LIVE_CLASSES = frozenset({"dog", "cat"})
DEFAULT_IDENTIFIER = "sks"
_PROMPT_LINE = re.compile(r"""^\s*'(?P<template>[^']*)'\.format\(unique_token,\s*class_token\),?\s*$""")


@dataclass(frozen=True)
class Subject:
    """One DreamBench subject and its prompt templates (``{0}`` = identifier, ``{1}`` = class noun)."""

    name: str
    class_noun: str
    live: bool
    image_dir: Path
    templates: tuple[str, ...]

    @property
    def images(self) -> list[Path]:
        """The subject's real images, in natural file-name order."""
        files = [p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        return sorted(files, key=natural_key)

    def prompts(self, identifier: str = DEFAULT_IDENTIFIER) -> list[str]:
        """The 25 evaluation prompts, e.g. ``a sks dog in the jungle``."""
        return [t.format(identifier, self.class_noun) for t in self.templates]

    @property
    def class_prompt(self) -> str:
        """The bare class prompt used for PRES (``a dog``)."""
        return f"a {self.class_noun}"


def remove_identifier(prompt: str, identifier: str) -> str:
    """Drop the identifier token (a whole word) and tidy the spaces: ``a sks dog`` → ``a dog``."""
    words = [w for w in prompt.split() if w != identifier]
    return " ".join(words)


def parse_prompts_file(path: str | Path) -> tuple[dict[str, str], list[str], list[str]]:
    """``prompts_and_classes.txt`` → (subject → class noun, object templates, live templates)."""
    path = Path(path)
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section, current = None, None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        lowered = line.lower()
        if lowered == "classes":
            section = "classes"
        elif lowered == "object prompts":
            section, current = "prompts", "object"
        elif lowered == "live subject prompts":
            section, current = "prompts", "live"
        elif section == "classes" and "," in line and line != "subject_name,class":
            name, noun = (part.strip() for part in line.split(",", 1))
            classes[name] = noun
        elif section == "prompts" and (match := _PROMPT_LINE.match(line)):
            lists[current].append(match["template"])
    problems = []
    if not classes:
        problems.append("no `subject_name,class` table")
    for kind, templates in lists.items():
        if len(templates) != 25:
            problems.append(f"{len(templates)} {kind} prompts instead of 25")
    if problems:
        raise EvalError(f"`{path}` is not a DreamBench prompt file: {'; '.join(problems)}.")
    return classes, lists["object"], lists["live"]


class DreamBench:
    """A DreamBench dataset folder: ``prompts_and_classes.txt`` and ``images/<subject>/NN.jpg``.

    A clone of ``google/dreambooth`` (``dataset/<subject>/``) works as well.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        prompts_file = self.root / PROMPTS_FILE
        if not prompts_file.is_file():
            raise EvalError(
                f"`--dataset` folder `{self.root}` has no `{PROMPTS_FILE}`. Point it at the DreamBench folder "
                "(the one holding `prompts_and_classes.txt` and `images/`)."
            )
        self.classes, self.object_templates, self.live_templates = parse_prompts_file(prompts_file)

    @cached_property
    def subjects(self) -> dict[str, Subject]:
        """All subjects, by name, in the file's order."""
        return {name: self._make(name, noun) for name, noun in self.classes.items()}

    def _make(self, name: str, noun: str) -> Subject:
        live = noun in LIVE_CLASSES
        # This repository's layout (images/<subject>/), the upstream repository's (dataset/<subject>/), or flat.
        candidates = [self.root / "images" / name, self.root / "dataset" / name, self.root / name]
        image_dir = next((c for c in candidates if c.is_dir()), candidates[0])
        templates = self.live_templates if live else self.object_templates
        return Subject(name, noun, live, image_dir, tuple(templates))

    def subject(self, name: str) -> Subject:
        """One subject by name; the error lists the available ones."""
        if name not in self.subjects:
            raise EvalError(
                f"Subject `{name}` is not in the DreamBench dataset at `{self.root}` (`--subjects`). "
                f"Available: {', '.join(self.subjects)}."
            )
        subject = self.subjects[name]
        if not subject.image_dir.is_dir() or not subject.images:
            raise EvalError(f"Subject `{name}` has no images under `{subject.image_dir}`.")
        return subject

    def select(self, names: list[str] | None = None) -> list[Subject]:
        """The named subjects (all when `names` is None); every unknown name is reported at once."""
        if names is None:
            return [self.subject(n) for n in self.subjects]
        unknown = [n for n in names if n not in self.subjects]
        if unknown:
            raise EvalError(
                f"Subject(s) {', '.join(f'`{n}`' for n in unknown)} not in the DreamBench dataset at "
                f"`{self.root}` (`--subjects`). Available: {', '.join(self.subjects)}."
            )
        return [self.subject(n) for n in names]
