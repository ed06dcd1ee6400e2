"""The logic behind `app.py`, free of Gradio so it can be tested without a browser.

A :class:`Studio` holds one base pipeline (loaded once), the adapters discovered under the
configured folders, and the request limits. Adapters are loaded into the pipeline by name the
first time they are used and switched with the diffusers/peft adapter API afterwards; the base
is never reloaded. Every image goes through :func:`flatlora_diffusion.sampling.generate`, like the
trainer's validation and `eval/`, and is written as a PNG with its settings as text chunks::

    studio = Studio.open("toy:sd", ["outputs/demo"])
    settings = studio.settings(prompt="a sks ball on the beach", seed=0, steps=25)
    result = studio.compare(settings, {"demo": 1.0})       # columns: base, demo
    result.gallery()                                        # [(png path, caption), ...] row by row

Bad requests raise :class:`StudioError`, whose message is meant for the user (the UI shows it).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from flatlora_diffusion.adapters import (
    MODEL_TYPE_NAMES,
    WEIGHTS_NAME,
    AdapterError,
    AdapterInfo,
    denoiser_of,
    find_adapters,
    load_adapter,
    model_type_of,
)
from flatlora_diffusion.sampling import (
    SCHEDULERS,
    GenerationStopped,
    SampleSettings,
    compatible_schedulers,
    generate,
    load_pipeline,
    native_size,
    save_images,
)

logger = logging.getLogger(__name__)

DEFAULT_SCHEDULER = "default"  # the UI's name for "keep the base model's own scheduler"
TRAIN_HINT = "python train_dreambooth_flatlora.py --config configs/demo.yaml"
MAX_SCALE = 2.0  # |adapter scale|; beyond it images are noise
_KEEP_REQUESTS = 50  # request folders kept on disk; older ones are deleted
MAX_CELL_CHARS = 200  # a metadata value longer than this is cut in the adapter table

Progress = Callable[[int, int, str], None]  # (images done, images in total, what is being drawn)
Stop = Callable[[], bool]  # asked after every denoising step: true when nobody waits for the result any more


class StudioError(ValueError):
    """A request the app cannot serve; the message names the field or adapter and the fix."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one request, so that no request can exhaust memory or hold the queue for long."""

    max_steps: int = 100  # denoising steps per image
    max_side: int = 1024  # width and height, pixels
    max_images: int = 8  # images per column (drawn one at a time: memory does not grow with it)
    max_adapters: int = 4  # adapters selected at once; compare draws 1 + this many columns
    max_loaded: int = 8  # adapters kept in the pipeline; the least recently used are unloaded
    max_prompt_chars: int = 1000  # CLIP reads 77 tokens anyway
    # images × columns × steps × width × height / 10^6 ("megapixel-steps") of one request: 8 images ×
    # 2 columns × 50 steps at 1024×1024 px fit; what one worker can be held for is bounded by it.
    max_work: int = 800

    def __post_init__(self) -> None:
        errors = [f"`{name}` must be a positive integer, got {value!r}." for name, value in vars(self).items()
                  if not isinstance(value, int) or isinstance(value, bool) or value < 1]
        if not errors and (self.max_side % 8 or self.max_side < 64):
            errors.append(f"`max_side` must be a multiple of 8 and at least 64, got {self.max_side}.")
        if not errors and self.max_adapters > self.max_loaded:
            errors.append(f"`max_adapters` ({self.max_adapters}) cannot exceed `max_loaded` ({self.max_loaded}).")
        if errors:
            raise ValueError("Invalid app limits:\n  " + "\n  ".join(errors))


@dataclass
class Column:
    """The images of one model: the base (no adapter) or a set of adapters with their scales."""

    label: str
    adapters: dict[str, float]
    images: list[Image.Image] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # the PNGs, with settings as text chunks


@dataclass
class Result:
    """What one request produced: columns of images that share prompt, seeds and settings."""

    settings: SampleSettings
    columns: list[Column]
    seconds: float

    def gallery(self) -> list[tuple[str, str]]:
        """``(png path, caption)`` row by row: row ``i`` is seed ``seed + i``, one image per column."""
        return [(str(column.paths[i]), f"{column.label} · seed {self.settings.seed + i}")
                for i in range(self.settings.num_images) for column in self.columns]

    def summary(self) -> str:
        """One line for the UI: what was drawn, with which settings, how fast."""
        s = self.settings
        labels = " | ".join(column.label for column in self.columns)
        seeds = f"seed {s.seed}" if s.num_images == 1 else f"seeds {s.seed}–{s.seed + s.num_images - 1}"
        return (f"{s.num_images} image(s) × {len(self.columns)} column(s) ({labels}); {seeds}, {s.steps} steps, "
                f"guidance {s.guidance_scale}, {s.scheduler or DEFAULT_SCHEDULER} scheduler, "
                f"{s.width}×{s.height} px; {self.seconds:.1f} s.")


def work_of(settings: SampleSettings, columns: int) -> float:
    """The work of a request in megapixel-steps (denoising time grows about linearly with it)."""
    return settings.num_images * columns * settings.steps * settings.width * settings.height / 1e6


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


class Studio:
    """One cached base pipeline, the adapters found under ``adapter_roots``, and ``generate``/``compare``."""

    def __init__(self, pipe, *, base_model: str, adapter_roots: Sequence[str | os.PathLike] = (),
                 limits: Limits = Limits(), out_dir: str | os.PathLike | None = None) -> None:
        self.pipe = pipe
        self.base_model = str(base_model)
        self.base_label = model_label(self.base_model)  # what the page and the PNGs show
        self.model_type = model_type_of(pipe)
        self.adapter_roots = [Path(root) for root in adapter_roots]
        self.native_size = native_size(pipe)
        self.schedulers = compatible_schedulers(pipe)  # the samplers this base can use besides its own
        # The model's own size is always allowed (SDXL: 1024 px even under `--max-size 512`).
        self.limits = replace(limits, max_side=max(limits.max_side, self.native_size))
        self._own_out_dir = out_dir is None
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="flatlora-app-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.adapters: dict[str, AdapterInfo] = {}
        self.skipped: list[tuple[Path, str]] = []  # adapter folders that cannot be read, with the reason
        self.missing_roots: list[Path] = []
        self._root_of: dict[str, Path] = {}
        self._loaded: OrderedDict[str, tuple[int, int]] = OrderedDict()  # name -> weights (mtime, size)
        self._lock = threading.Lock()  # one request at a time uses the pipeline
        self._requests = 0
        self.seconds_per_work: float | None = None  # measured on the last request; None before the first
        self.scan()

    @classmethod
    def open(cls, base: str, adapter_roots: Sequence[str | os.PathLike] = (), *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, limits: Limits = Limits(),
             out_dir: str | os.PathLike | None = None) -> Studio:
        """Load ``base`` (a folder, a Hub id, ``toy:sd``, or ``tiny:sd``/``tiny:sdxl``, built if missing) once."""
        pipe = load_pipeline(str(base), device=device, dtype=dtype)
        return cls(pipe, base_model=base, adapter_roots=adapter_roots, limits=limits, out_dir=out_dir)

    # ----------------------------------------------------------------------------------------
    # Adapters

    def scan(self) -> None:
        """(Re)discover the adapters under the configured folders; missing folders are noted, not fatal."""
        with self._lock:
            self.missing_roots = [root for root in self.adapter_roots if not root.is_dir()]
            skipped: list[tuple[Path, str]] = []
            roots = [root.resolve() for root in self.adapter_roots if root.is_dir()]
            found = find_adapters(roots, skipped=skipped) if roots else []
            self.adapters = {info.name: info for info in found}
            self._root_of = {info.name: next(r for r in roots if info.path.is_relative_to(r)) for info in found}
            self.skipped = skipped
            for name in [name for name in self._loaded if name not in self.adapters]:
                self._unload(name)  # gone, or renamed by the rescan: the name may now mean another folder

    def problem(self, info: AdapterInfo) -> str | None:
        """Why ``info`` cannot be used with this base (architecture), or None."""
        if info.model_type is not None and info.model_type != self.model_type:
            trained, here = MODEL_TYPE_NAMES.get(info.model_type, info.model_type), MODEL_TYPE_NAMES[self.model_type]
            return (f"trained for {trained}; this app's base is {here} — "
                    f"start the app with `--base` set to its base model, `{model_label(info.base_model)}`")
        dim = getattr(denoiser_of(self.pipe)[1].config, "cross_attention_dim", None)
        if info.cross_attention_dim is not None and info.cross_attention_dim != dim:
            return f"trained on a UNet with cross-attention width {info.cross_attention_dim}; this base's is {dim}"
        return None

    def _check_selection(self, adapters: Mapping[str, Any]) -> dict[str, float]:
        """``{name: scale}`` from the UI, validated: known names only, bounded count and scales."""
        if not isinstance(adapters, Mapping):
            raise StudioError(f"Adapters must be given as {{name: scale}}, got {adapters!r}.")
        errors = []
        if len(adapters) > self.limits.max_adapters:
            errors.append(f"Select at most {self.limits.max_adapters} adapters, got {len(adapters)}.")
        selection = {}
        for name, scale in adapters.items():
            if not isinstance(name, str) or name not in self.adapters:
                known = ", ".join(f"`{n}`" for n in self.adapters) or "none"
                errors.append(f"Unknown adapter {str(name)[:80]!r} (known: {known}); click **Rescan** after training.")
                continue
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) \
                    or abs(scale) > MAX_SCALE:
                errors.append(f"The scale of `{name}` must be a number in [-{MAX_SCALE}, {MAX_SCALE}], got {scale!r}.")
                continue
            selection[name] = float(scale)
        if errors:
            raise StudioError("\n".join(errors))
        return selection

    def _ensure_loaded(self, names: Iterable[str]) -> None:
        """Load the named adapters into the pipeline unless already there (reload those re-trained since)."""
        for name in names:
            info, root = self.adapters[name], self._root_of[name]
            weights = info.path / WEIGHTS_NAME
            if not weights.resolve().is_relative_to(root):  # replaced by a link since the scan
                raise StudioError(f"Adapter `{name}` now points outside `{_label(root)}`; it is not loaded.")
            try:
                stat = weights.stat()
            except OSError as err:
                raise StudioError(f"Adapter `{name}`: `{self.shown(weights)}` is gone; click **Rescan**.") from err
            signature = (stat.st_mtime_ns, stat.st_size)
            if self._loaded.get(name) == signature:
                self._loaded.move_to_end(name)
                continue
            problem = self.problem(info)
            if problem:
                raise StudioError(f"Adapter `{name}` cannot be used: {problem}.")
            if name in self._loaded:
                self._unload(name)
            while len(self._loaded) >= self.limits.max_loaded:
                self._unload(next(iter(self._loaded)))
            try:
                load_adapter(self.pipe, info.path, name)
            except AdapterError as err:
                raise StudioError(self.shown(f"Adapter `{name}` cannot be used: {err}")) from err
            self._loaded[name] = signature

    def _unload(self, name: str) -> None:
        self._loaded.pop(name, None)
        try:
            self.pipe.delete_adapters(name)
        except ValueError as err:  # not in every component: nothing left to remove
            logger.debug("delete_adapters(%s): %s", name, err)

    # ----------------------------------------------------------------------------------------
    # Requests

    def settings(self, prompt: str, negative_prompt: str | None = None, *, seed: Any = 0, steps: Any = 20,
                 guidance_scale: Any = 7.5, width: Any = None, height: Any = None, num_images: Any = 1,
                 scheduler: str | None = DEFAULT_SCHEDULER) -> SampleSettings:
        """Validated :class:`SampleSettings` within :class:`Limits`; all problems are reported together."""
        lim, errors = self.limits, []

        def integer(name: str, value: Any, low: int, high: int) -> int | None:
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # sliders and number boxes send floats
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                errors.append(f"`{name}` must be an integer in [{low}, {high}], got {value!r}.")
                return None
            return value

        if not isinstance(prompt, str) or len(prompt) > lim.max_prompt_chars:
            errors.append(f"`prompt` must be text of at most {lim.max_prompt_chars} characters.")
        if negative_prompt is not None and (not isinstance(negative_prompt, str)
                                            or len(negative_prompt) > lim.max_prompt_chars):
            errors.append(f"`negative prompt` must be text of at most {lim.max_prompt_chars} characters.")
        values = {
            "seed": integer("seed", seed, 0, 2**32 - 1),
            "steps": integer("steps", steps, 1, lim.max_steps),
            "num_images": integer("number of images", num_images, 1, lim.max_images),
            "width": integer("width", self.native_size if width is None else width, 64, lim.max_side),
            "height": integer("height", self.native_size if height is None else height, 64, lim.max_side),
        }
        for side in ("width", "height"):
            if values[side] is not None and values[side] % 8:
                errors.append(f"`{side}` must be a multiple of 8, got {values[side]}.")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) \
                or not 0 <= guidance_scale <= 30:
            errors.append(f"`guidance scale` must be a number in [0, 30], got {guidance_scale!r}.")
        if scheduler not in (None, DEFAULT_SCHEDULER, *SCHEDULERS):
            errors.append(f"`scheduler` must be one of {DEFAULT_SCHEDULER}, {', '.join(SCHEDULERS)}; "
                          f"got {str(scheduler)[:40]!r}.")
        elif scheduler in SCHEDULERS and scheduler not in self.schedulers:
            errors.append(f"`scheduler` {scheduler} does not work with this base (a flow-matching model); use "
                          f"{', '.join([DEFAULT_SCHEDULER, *self.schedulers])}.")
        if errors:
            raise StudioError("Invalid request:\n" + "\n".join(f"- {e}" for e in errors))
        try:
            return SampleSettings(prompt=prompt, negative_prompt=negative_prompt or None,
                                  guidance_scale=float(guidance_scale),
                                  scheduler=None if scheduler == DEFAULT_SCHEDULER else scheduler, **values)
        except ValueError as err:
            raise StudioError(str(err)) from err

    def generate(self, settings: SampleSettings, adapters: Mapping[str, float] | None = None,
                 progress: Progress | None = None, stop: Stop | None = None) -> Result:
        """``settings.num_images`` images with all ``adapters`` active together (none: the base model)."""
        selection = self._check_selection(adapters or {})
        label = " + ".join(f"{name} ×{scale:g}" for name, scale in selection.items()) or "base"
        return self._run(settings, [(label, selection)], progress, stop)

    def compare(self, settings: SampleSettings, adapters: Mapping[str, float] | None = None,
                progress: Progress | None = None, stop: Stop | None = None) -> Result:
        """The same prompt and seeds drawn by the base model and by each adapter alone, one column each."""
        selection = self._check_selection(adapters or {})
        columns = [("base", {})] + [(f"{name} ×{scale:g}", {name: scale}) for name, scale in selection.items()]
        return self._run(settings, columns, progress, stop)

    def estimate(self, work: float) -> str:
        """The expected duration of ``work`` megapixel-steps at the speed measured on the last request."""
        if self.seconds_per_work is None:
            return "time unknown until the first request has been measured"
        return f"about {_duration(work * self.seconds_per_work)} at this server's measured speed"

    def _check_work(self, settings: SampleSettings, columns: int) -> float:
        work = work_of(settings, columns)
        if work > self.limits.max_work:
            raise StudioError(
                f"This request is too large: {settings.num_images} image(s) × {columns} column(s) × {settings.steps} "
                f"steps × {settings.width}×{settings.height} px = {work:.0f} megapixel-steps ({self.estimate(work)}); "
                f"the limit (`--max-work`) is {self.limits.max_work}. Draw fewer images, steps or pixels, "
                "or compare fewer adapters.")
        return work

    def _run(self, settings: SampleSettings, columns: list[tuple[str, dict[str, float]]],
             progress: Progress | None, stop: Stop | None = None) -> Result:
        if not isinstance(settings, SampleSettings):
            raise StudioError("`settings` must come from `Studio.settings`.")
        if settings.num_images > self.limits.max_images or settings.steps > self.limits.max_steps:
            raise StudioError(f"At most {self.limits.max_images} images of at most {self.limits.max_steps} steps.")
        work = self._check_work(settings, len(columns))
        total = settings.num_images * len(columns)
        with self._lock:
            start = time.perf_counter()  # after the wait in line: the rate is the pipeline's own
            self._ensure_loaded({name for _, active in columns for name in active})
            out = self._request_dir()
            result = []
            for index, (label, active) in enumerate(columns):
                column = Column(label, active)
                for i in range(settings.num_images):  # one at a time: memory stays that of one image
                    if progress:
                        estimate = f" ({self.estimate(work)} in all)" if index == i == 0 else ""
                        progress(index * settings.num_images + i, total, f"{label}: image {i + 1}{estimate}")
                    try:
                        column.images += generate(self.pipe, settings.for_image(i), adapters=active or None,
                                                  stop=stop)
                    except GenerationStopped as err:
                        raise StudioError(f"Stopped: the client went away ({index * settings.num_images + i} "
                                          f"of {total} images drawn).") from err
                stem = f"{index}-{_file_label(label)}_seed{settings.seed}"
                column.paths = save_images(column.images, out, stem, settings,
                                           extra={"base_model": self.base_label, "adapters": active})
                result.append(column)
            if progress:
                progress(total, total, "done")
            seconds = time.perf_counter() - start
            self.seconds_per_work = seconds / work
        return Result(settings, result, seconds)

    def _request_dir(self) -> Path:
        """A fresh folder for this request's PNGs; the oldest are removed beyond the last few."""
        self._requests += 1
        out = self.out_dir / f"request-{self._requests:06d}"
        out.mkdir(parents=True)
        old = sorted(p for p in self.out_dir.iterdir() if p.is_dir() and p.name.startswith("request-"))
        for folder in old[:-_KEEP_REQUESTS]:
            shutil.rmtree(folder, ignore_errors=True)
        return out

    def close(self) -> None:
        """Remove the images written by this studio (when it chose the folder)."""
        if self._own_out_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    # ----------------------------------------------------------------------------------------
    # What the UI shows

    def shown(self, text: str | os.PathLike) -> str:
        """``text`` as the page may show it: the adapter roots' and the base folder's locations cut to their names.

        The page goes to whoever can reach the app (Gradio's `/config` serves it), so it names a folder
        relative to its adapter root (`runs/dog/...`), never by its absolute path on the server.
        """
        text = str(text)
        places = {str(root.resolve()): _label(root) for root in self.adapter_roots}
        places |= {str(root): _label(root) for root in self.adapter_roots if root.is_absolute()}
        if self.base_label != self.base_model:
            places |= {str(Path(self.base_model).resolve()): self.base_label, self.base_model: self.base_label}
        for place in sorted(places, key=len, reverse=True):
            text = text.replace(place, places[place])
        return text

    def describe(self) -> str:
        """Markdown: the base, the adapter folders, a table of the adapters' settings, and problems."""
        roots = ", ".join(f"`{_label(root)}`" for root in self.adapter_roots) or "none (`--adapters DIR`)"
        lines = [f"**Base model** `{self.base_label}` ({self.model_type.upper()}, {self.native_size} px native) · "
                 f"**Adapter folders** {roots}", ""]
        for root in self.missing_roots:
            lines.append(f"- Folder `{_label(root)}` does not exist (yet).")
        if not self.adapters:
            lines += ["", f"No adapter found. Train one with `{TRAIN_HINT}` (it writes `outputs/demo`), "
                          "then click **Rescan**. Meanwhile the base model works on its own."]
        else:
            lines += ["", "| Adapter | Method | Rank / alpha | Steps | Instance prompt | Base model | Notes |",
                      "|---|---|---|---|---|---|---|"]
            for name, info in self.adapters.items():
                lines.append("| " + " | ".join(self._row(name, info)) + " |")
        if self.skipped:
            lines += ["", "**Skipped** (cannot be read; only `pytorch_lora_weights.safetensors` is ever loaded):"]
            lines += [f"- `{_cell(self.shown(folder))}`: {_cell(self.shown(reason))}" for folder, reason in self.skipped]
        return self.shown("\n".join(lines))

    def _row(self, name: str, info: AdapterInfo) -> list[str]:
        """The table cells of one adapter; every value from its metadata is cut to :data:`MAX_CELL_CHARS`."""
        method = f"Flat-LoRA (ρ {info.rho:g}, {info.schedule})" if info.rho else "LoRA"
        method += " + DoRA" if info.dora else ""
        notes = []
        if problem := self.problem(info):
            notes.append(f"⚠ {problem}")
        elif info.base_model and info.base_model != self.base_model:
            notes.append(f"trained on another base (`{model_label(info.base_model)}`)")
        if info.validation_images:
            notes.append(f"{len(info.validation_images)} validation image(s)")
        rank = f"{info.rank} / {info.alpha:g}" if info.rank is not None and info.alpha is not None else "?"
        cells = [name, method, rank, info.training.get("steps", "?"), info.training.get("instance_prompt") or "—",
                 model_label(info.base_model or "?"), "; ".join(notes) or "—"]
        cells = [_cell(self.shown(cell)) for cell in cells]
        return [f"`{cell}`" if i in (0, 5) else cell for i, cell in enumerate(cells)]

    def validation_images(self, name: str, limit: int = 8) -> list[tuple[Image.Image, str]]:
        """Thumbnails of the adapter's validation images (read from inside its folder only)."""
        info = self.adapters.get(name)
        if info is None:
            return []
        thumbs = []
        for path in info.validation_images[:limit]:
            try:
                with Image.open(path) as image:
                    image.thumbnail((256, 256))
                    thumbs.append((image.convert("RGB"), path.relative_to(info.path).as_posix()))
            except (OSError, ValueError) as err:
                logger.warning("Cannot read validation image `%s`: %s", path, err)
        return thumbs


def _label(folder: Path) -> str:
    """A folder as the page names it: its own name (`.` is the name of the folder it means)."""
    return folder.resolve().name or "/"


def model_label(model: str) -> str:
    """A base model as the page shows it: a local folder by its name only, a Hub id or `toy:sd` as it is."""
    path = Path(model)
    return path.name if path.is_absolute() or (":" not in model and path.exists()) else model


def _cell(value: Any) -> str:
    """A value as one Markdown table cell, cut to :data:`MAX_CELL_CHARS` (metadata can be any size)."""
    text = str(value)
    if len(text) > MAX_CELL_CHARS:
        text = f"{text[:MAX_CELL_CHARS]}… ({len(text)} characters)"
    return text.replace("|", "\\|").replace("\n", " ")


def _file_label(label: str) -> str:
    """A column label as part of a file name (`dog ×0.5` -> `dog-x0.5`)."""
    text = label.replace(" ×", "-x").replace(" + ", "+")
    return "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in text)[:80]
