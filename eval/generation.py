"""The DreamBench images of each run: which adapter serves which subject, and seeded, resumable generation.

All sampling goes through `flatlora_diffusion.sampling` (the module the trainer's validation and
the app use) and adapters are loaded by `flatlora_diffusion.adapters`. Layout under ``--out``::

    images/<run>/<subject>/p{prompt:02d}_{image:03d}.png   # N images for each of the subject's prompts
    images/<run>/<subject>/class_{image:03d}.png           # PRES: the bare class prompt, adapter active

Every PNG carries the settings that made it; on a rerun, images already on disk with the same
settings are kept and only the missing ones are generated (image i of a prompt always has the
same seed, so a resumed run gives the same images as an uninterrupted one).
"""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from eval.config import DreamBenchConfig, resolve_device
from eval.dreambench import Subject
from eval.errors import EvalError
from flatlora_diffusion.files import save_image

if TYPE_CHECKING:
    from flatlora_diffusion.sampling import SampleSettings

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # flatlora_diffusion.adapters.WEIGHTS_NAME
PRES_SEED_OFFSET = 1_000_000  # class-prompt images never share seeds with the subject prompts


@dataclass(frozen=True)
class Run:
    """One compared run: a name and the adapter folder of each subject (None: the base model alone)."""

    name: str
    path: Path | None
    adapters: dict[str, Path | None]


BASE_RUN = "none"  # `--adapters base=none`: the base model without an adapter, as a run of its own


def parse_run(spec: str) -> tuple[str, Path | None]:
    """``NAME=DIR``, ``DIR`` (named after the folder) or ``NAME=none`` (the base model alone)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).resolve().name, spec
    if path.strip() == BASE_RUN:
        return name.strip(), None
    return name.strip(), Path(path).expanduser()


def resolve_runs(specs: list[str], subjects: list[str]) -> list[Run]:
    """Find every (run, subject) adapter before anything runs; all problems are reported together."""
    runs, errors = [], []
    for spec in specs:
        name, path = parse_run(spec)
        if path is None:
            runs.append(Run(name, None, dict.fromkeys(subjects)))
            continue
        if not path.is_dir():
            errors.append(f"`--adapters` run `{name}`: folder `{path}` does not exist.")
            continue
        adapters = {}
        for subject in subjects:
            if (path / subject / WEIGHTS_NAME).is_file():
                adapters[subject] = path / subject
            elif (path / WEIGHTS_NAME).is_file():
                adapters[subject] = path  # one adapter folder shared by every subject
            else:
                errors.append(f"`--adapters` run `{name}` has no adapter for subject `{subject}`: expected "
                              f"`{path / subject / WEIGHTS_NAME}` (one trainer output per subject) or `{path / WEIGHTS_NAME}`.")
        runs.append(Run(name, path, adapters))
    names = [r.name for r in runs]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"`--adapters`: two runs are named `{name}`; name them `NAME=DIR`.")
    if errors:
        raise EvalError("Cannot evaluate these runs:\n  - " + "\n  - ".join(errors))
    return runs


@dataclass
class ImageTask:
    """The images of one (run, subject, prompt): settings of image 0 and one file per image."""

    run: str
    subject: str
    adapter: Path
    prompt_index: int | None  # None: the class prompt of PRES
    settings: SampleSettings
    paths: list[Path]
    extra: dict

    @property
    def prompt(self) -> str:
        return self.settings.prompt


def plan(runs: list[Run], subjects: list[Subject], config: DreamBenchConfig) -> list[ImageTask]:
    """Every image the evaluation needs, grouped by (run, subject) so each adapter loads once."""
    from flatlora_diffusion.sampling import SampleSettings

    common = {"steps": config.steps, "guidance_scale": config.guidance_scale, "negative_prompt": config.negative_prompt,
              "scheduler": config.scheduler, "width": config.width, "height": config.height}
    try:
        SampleSettings(prompt="", **common)  # the sampler's own checks (sizes, scheduler names), once
    except ValueError as err:
        raise EvalError(f"Invalid generation settings (flags of the same names): {err}") from err
    n = config.images_per_prompt
    tasks = []
    for run in runs:
        for subject in subjects:
            folder = Path(config.out) / "images" / run.name / subject.name
            adapter = run.adapters[subject.name]
            extra = {"base_model": config.base, "adapter": str(adapter.resolve()) if adapter else BASE_RUN,
                     "run": run.name, "subject": subject.name}
            prompts = subject.prompts(config.identifier)[: config.max_prompts]
            for p, prompt in enumerate(prompts):
                settings = SampleSettings(prompt=prompt, num_images=n, seed=config.seed + p * n, **common)
                paths = [folder / f"p{p:02d}_{i:03d}.png" for i in range(n)]
                tasks.append(ImageTask(run.name, subject.name, run.adapters[subject.name], p, settings, paths, extra))
            if config.pres:
                k = config.pres_images
                settings = SampleSettings(prompt=subject.class_prompt, num_images=k,
                                          seed=config.seed + PRES_SEED_OFFSET, **common)
                paths = [folder / f"class_{i:03d}.png" for i in range(k)]
                tasks.append(ImageTask(run.name, subject.name, run.adapters[subject.name], None, settings, paths, extra))
    return tasks


def _saved_with(path: Path) -> dict | None:
    """The generation record stored in a PNG, or None when the file is absent or unreadable."""
    try:
        with Image.open(path) as image:
            record = image.info.get("flatlora")  # text chunks before the pixel data, read by `open`
            image.verify()  # a truncated file (crash mid-write) is regenerated
        return json.loads(record) if record else None
    except (OSError, ValueError, SyntaxError):
        return None


def missing_images(tasks: list[ImageTask]) -> dict[int, list[int]]:
    """task index → image indices still to generate. Images made with other settings are an error."""
    todo, stale = {}, []
    for t, task in enumerate(tasks):
        for i, path in enumerate(task.paths):
            record = _saved_with(path) if path.exists() else None
            expected = {"settings": task.settings.for_image(i).to_dict(), **task.extra}
            if record is None:
                todo.setdefault(t, []).append(i)
            elif any(record.get(k) != v for k, v in expected.items() if k in ("settings", "base_model", "adapter")):
                stale.append(path)
    if stale:
        raise EvalError(
            f"{len(stale)} image(s) under `{stale[0].parents[2]}` were generated with other settings, base model or "
            f"adapter (first: `{stale[0]}`). Use another `--out`, or delete them to regenerate."
        )
    return todo


def _blocks(indices: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] → [(0, 3), (5, 7)]: contiguous ranges, generated as one request each."""
    blocks: list[list[int]] = []
    for i in indices:
        if blocks and blocks[-1][1] == i:
            blocks[-1][1] = i + 1
        else:
            blocks.append([i, i + 1])
    return [(a, b) for a, b in blocks]


def generate_missing(tasks: list[ImageTask], todo: dict[int, list[int]], config: DreamBenchConfig) -> int:
    """Generate the `todo` images through `flatlora_diffusion.sampling`; returns how many were written."""
    from flatlora_diffusion import sampling
    from flatlora_diffusion.adapters import AdapterError, adapter_name_for, load_adapter

    total = sum(len(v) for v in todo.values())
    try:
        pipe = sampling.load_pipeline(config.base, device=resolve_device(config.device), dtype=config.generation_dtype())
    except ValueError as err:  # PipelineLoadError
        raise EvalError(f"`--base`: {err}") from err
    loaded: tuple[str, Path] | None = None
    written = 0
    with tqdm(total=total, desc="generating", unit="img", disable=None) as bar:
        for t in sorted(todo):
            task = tasks[t]
            if task.adapter is None and loaded is not None:
                pipe.delete_adapters(loaded[0])
                loaded = None
            elif task.adapter is not None and (loaded is None or loaded[1] != task.adapter):
                if loaded is not None:
                    pipe.delete_adapters(loaded[0])
                name = adapter_name_for(f"{task.run}_{task.subject}")
                try:
                    info = load_adapter(pipe, task.adapter, name)  # quiet about a UNet-only LoRA's text encoders
                    _check_identifier(info, config.identifier)
                except AdapterError as err:
                    raise EvalError(f"`--adapters` run `{task.run}`, subject `{task.subject}`: {err}") from err
                loaded = (name, task.adapter)
            task.paths[0].parent.mkdir(parents=True, exist_ok=True)
            for a, b in _blocks(todo[t]):
                request = replace(task.settings, seed=task.settings.seed + a, num_images=b - a)
                active = {loaded[0]: 1.0} if loaded is not None else None
                images = sampling.generate(pipe, request, adapters=active, batch_size=config.gen_batch_size)
                for k, image in enumerate(images):
                    i = a + k
                    info = task.settings.for_image(i).to_png_info(task.extra)
                    save_image(image, task.paths[i], pnginfo=info)
                    written += 1
                bar.update(b - a)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return written


def _check_identifier(info, identifier: str) -> None:
    prompt = (info.training or {}).get("instance_prompt")
    if prompt and identifier not in prompt.split():
        warnings.warn(
            f"Adapter `{info.path}` was trained with the instance prompt {prompt!r}, which does not contain the "
            f"identifier `{identifier}` (`--identifier`); its prompts will not name the subject.",
            stacklevel=3,
        )
