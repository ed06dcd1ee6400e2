"""The one sampling module: validation, class-image generation, evaluation and the app all sample here.

Typical use::

    pipe = load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", device="cuda", dtype=torch.float16)
    load_adapter(pipe, "runs/dog", "dog")                      # flatlora_diffusion.adapters
    settings = SampleSettings(prompt="a sks dog on the beach", num_images=4, seed=0)
    images = generate(pipe, settings, adapters={"dog": 1.0}, batch_size=2)
    save_images(images, "out", "dog", settings, extra={"adapters": {"dog": 1.0}})

Image ``i`` of a request is drawn from its own generator seeded with ``seed + i`` (on the CPU, so
the starting noise is the same on any device): it is the same image whether generated alone, in a
batch, or as image 0 of a request with ``seed + i``. The global RNG is never used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn

from flatlora_diffusion.files import save_image

# name -> (diffusers scheduler class name, config overrides). The overrides are explicit so that
# switching back and forth never keeps a setting of the previous scheduler (e.g. Karras sigmas).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

MAX_SIDE = 4096  # pixels; larger requests are almost certainly a typo
MAX_STEPS = 1000  # the schedulers' training timesteps


class PipelineLoadError(ValueError):
    """A base model could not be loaded as a diffusers pipeline; the message names it and the fix."""


def load_pipeline(
    base: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | os.PathLike | nn.Module | None = None,
    components: Mapping[str, Any] | None = None,
    progress: bool = False,
):
    """Load a diffusers pipeline (SD 1.x/2.x, SDXL, ...) from a folder, a Hub id or a `tiny:`/`toy:` id.

    ``vae`` replaces the pipeline's VAE (a folder/Hub id of an ``AutoencoderKL`` or a loaded
    module, e.g. an fp16-safe SDXL VAE); ``components`` passes already-loaded modules (``unet``,
    ``text_encoder``, ...) that are then not read from disk; ``progress`` shows the denoising bar.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline

    from flatlora_diffusion.model_ids import ModelIdError, resolve_model_id

    try:
        base = resolve_model_id(str(base), "base model")
    except ModelIdError as err:
        raise PipelineLoadError(str(err)) from err
    path = Path(base).expanduser()
    if path.exists():
        if path.is_file():
            raise PipelineLoadError(
                f"`{base}` is a single file; a diffusers pipeline folder (with `model_index.json`) is expected. "
                "Convert single-file checkpoints with diffusers' `from_single_file(...).save_pretrained(DIR)`."
            )
        if not (path / "model_index.json").is_file():
            raise PipelineLoadError(
                f"`{base}` is not a diffusers pipeline folder: `model_index.json` is missing. Pass a folder "
                "written by `save_pretrained` (with `unet/`, `vae/`, `text_encoder/`, ...) or a Hub model id."
            )
    kwargs: dict[str, Any] = {**(components or {}), **_dtype_kwargs(dtype)}
    if vae is not None:
        kwargs["vae"] = vae if isinstance(vae, nn.Module) else _load_vae(AutoencoderKL, vae, dtype, revision)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(path) if path.exists() else str(base), revision=revision, variant=variant, **kwargs
        )
    except OSError as err:
        raise PipelineLoadError(
            f"Could not load the base model `{base}` (revision={revision!r}, variant={variant!r}): {err}. "
            "Pass a local diffusers pipeline folder or a Hub model id you can access (check `HF_TOKEN` and "
            "that `--variant` exists, e.g. `fp16`)."
        ) from err
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def native_size(pipe) -> int:
    """The side in pixels the pipeline generates when no size is given (SD 1.5: 512, SDXL/SD3/FLUX: 1024)."""
    from flatlora_diffusion.adapters import denoiser_of

    latent = getattr(pipe, "default_sample_size", None) or denoiser_of(pipe)[1].config.sample_size
    return int(latent) * int(pipe.vae_scale_factor)


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers >= 0.42 names the argument `dtype` (`torch_dtype` is deprecated); older ones `torch_dtype`."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}


def _load_vae(vae_class, vae: str | os.PathLike, dtype: torch.dtype, revision: str | None) -> nn.Module:
    try:
        return vae_class.from_pretrained(str(vae), revision=revision, **_dtype_kwargs(dtype))
    except OSError as err:
        raise PipelineLoadError(f"Could not load the VAE `{vae}`: {err}. Pass an `AutoencoderKL` folder or Hub id.") from err


def compatible_schedulers(pipe) -> list[str]:
    """The names in :data:`SCHEDULERS` that work with ``pipe`` (none for flow-matching SD3/FLUX)."""
    import diffusers

    return [name for name, (class_name, _) in SCHEDULERS.items()
            if getattr(diffusers, class_name) in pipe.scheduler.compatibles]


def set_scheduler(pipe, name: str) -> None:
    """Replace ``pipe.scheduler`` by scheduler ``name`` (a key of :data:`SCHEDULERS`), same config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler `{name}`; choose one of {', '.join(SCHEDULERS)}.")
    class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    if scheduler_class not in pipe.scheduler.compatibles:
        raise ValueError(f"Scheduler `{name}` does not work with this model's `{type(pipe.scheduler).__name__}` "
                         "(SD3 and FLUX are flow-matching models); keep the model's own scheduler.")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)


@dataclass
class SampleSettings:
    """What to generate. ``width``/``height`` ``None`` use the pipeline's native size."""

    prompt: str = field(metadata={"help": "Text prompt."})
    negative_prompt: str | None = field(default=None, metadata={"help": "Negative prompt (with guidance > 1)."})
    num_images: int = field(default=1, metadata={"help": "Images to generate; image i uses seed `seed + i`."})
    seed: int = field(default=0, metadata={"help": "Seed of image 0."})
    steps: int = field(default=30, metadata={"help": "Denoising steps."})
    guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance; <= 1 disables it."})
    width: int | None = field(default=None, metadata={"help": "Width in pixels, a multiple of 8."})
    height: int | None = field(default=None, metadata={"help": "Height in pixels, a multiple of 8."})
    scheduler: str | None = field(default=None, metadata={"help": f"One of {', '.join(SCHEDULERS)}; None keeps the pipeline's."})

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.prompt, str):
            errors.append(f"`prompt` must be a string, got {self.prompt!r}.")
        if not _is_int(self.num_images) or not 1 <= self.num_images <= 10_000:
            errors.append(f"`num_images` must be an integer in [1, 10000], got {self.num_images!r}.")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63 - 10_000:
            errors.append(f"`seed` must be a non-negative integer below 2**63 - 10000, got {self.seed!r}.")
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            errors.append(f"`steps` must be an integer in [1, {MAX_STEPS}], got {self.steps!r}.")
        if not isinstance(self.guidance_scale, (int, float)) or not 0 <= self.guidance_scale <= 50:
            errors.append(f"`guidance_scale` must be a number in [0, 50], got {self.guidance_scale!r}.")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value % 8 or not 64 <= value <= MAX_SIDE):
                errors.append(f"`{name}` must be a multiple of 8 in [64, {MAX_SIDE}] (or None), got {value!r}.")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            errors.append(f"`scheduler` must be one of {', '.join(SCHEDULERS)} (or None), got {self.scheduler!r}.")
        if errors:
            raise ValueError("Invalid SampleSettings:\n  " + "\n  ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings."""
        return asdict(self)

    def for_image(self, index: int) -> SampleSettings:
        """The settings that regenerate image ``index`` alone."""
        return replace(self, num_images=1, seed=self.seed + index)

    def to_png_info(self, extra: Mapping[str, Any] | None = None) -> PngInfo:
        """PNG text chunks: ``parameters`` (A1111-style, human-readable) and ``flatlora`` (JSON)."""
        size = f"{self.width}x{self.height}" if self.width and self.height else "native"
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(f"Steps: {self.steps}, Sampler: {self.scheduler or 'default'}, CFG scale: {self.guidance_scale}, "
                     f"Seed: {self.seed}, Size: {size}")
        info = PngInfo()
        info.add_text("parameters", "\n".join(lines))
        info.add_text("flatlora", json.dumps({"settings": self.to_dict(), **(extra or {})}, sort_keys=True))
        return info


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def active_adapter_names(pipe) -> set[str]:
    """Names of all LoRA adapters loaded in any component of ``pipe``."""
    if not hasattr(pipe, "get_list_adapters"):
        return set()
    return {name for names in pipe.get_list_adapters().values() for name in names}


def activate_adapters(pipe, adapters: Mapping[str, float] | None) -> None:
    """Make exactly ``adapters`` (name -> scale) active; ``None`` or ``{}`` runs the base model."""
    loaded = active_adapter_names(pipe)
    if not adapters:
        if loaded:
            pipe.disable_lora()
        return
    missing = sorted(set(adapters) - loaded)
    if missing:
        raise ValueError(
            f"Adapter(s) {missing} are not loaded in the pipeline (loaded: {sorted(loaded) or 'none'}); "
            "load them first with `flatlora_diffusion.adapters.load_adapter`."
        )
    pipe.enable_lora()
    pipe.set_adapters(list(adapters), [float(scale) for scale in adapters.values()])


class GenerationStopped(RuntimeError):
    """``generate``'s ``stop`` said to stop; the images of the interrupted call are discarded."""


def generate(
    pipe,
    settings: SampleSettings,
    *,
    adapters: Mapping[str, float] | None = None,
    batch_size: int = 1,
    stop: Callable[[], bool] | None = None,
) -> list[Image.Image]:
    """Generate ``settings.num_images`` images with exactly ``adapters`` active (``None``: base model).

    Images are produced ``batch_size`` at a time; image ``i`` uses a CPU generator seeded with
    ``settings.seed + i``, so batching does not change which image a seed gives (the pixels may
    differ by float rounding of batched kernels). ``settings.scheduler`` replaces the pipeline's
    scheduler for this call only, so a later call without one gets the pipeline's own again.
    ``stop``, if given, is asked after every denoising step; when it says so, the pipeline is
    interrupted and :class:`GenerationStopped` is raised.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    activate_adapters(pipe, adapters)
    own_scheduler = pipe.scheduler
    if settings.scheduler is not None:
        set_scheduler(pipe, settings.scheduler)
    images: list[Image.Image] = []
    stopped = False

    def on_step_end(pipe, step, timestep, tensors):
        nonlocal stopped
        if stop():
            stopped = pipe._interrupt = True  # diffusers skips the remaining steps
        return tensors

    step_hook = {"callback_on_step_end": on_step_end} if stop is not None else {}
    try:
        for start in range(0, settings.num_images, batch_size):
            count = min(batch_size, settings.num_images - start)
            generators = [torch.Generator("cpu").manual_seed(settings.seed + start + k) for k in range(count)]
            output = pipe(
                prompt=settings.prompt,
                negative_prompt=settings.negative_prompt,
                num_images_per_prompt=count,
                generator=generators,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                width=settings.width,
                height=settings.height,
                output_type="pil",
                **step_hook,
            )
            if stopped:
                raise GenerationStopped(f"Stopped after {len(images)} of {settings.num_images} image(s).")
            images.extend(output.images)
    finally:
        pipe.scheduler = own_scheduler
    return images


def pipeline_from_models(
    base: str | os.PathLike,
    *,
    denoiser: Mapping[str, nn.Module],
    text_encoders: Mapping[str, nn.Module] | None = None,
    vae: str | os.PathLike | nn.Module | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
):
    """A pipeline around the in-memory models being trained (for validation during training).

    ``denoiser`` is ``{"unet": unet}`` or ``{"transformer": transformer}``. Only the remaining parts
    (VAE unless given, tokenizers, frozen text encoders not passed, scheduler) are read from ``base``;
    the pipeline holds references to the passed models, so it can be built once and reused: later
    calls of :func:`generate_validation` see the current weights.
    ``dtype`` is the dtype of the parts read from disk: use the dtype of the in-memory models.
    """
    components = {**denoiser, **(text_encoders or {})}
    return load_pipeline(base, device=device, dtype=dtype, revision=revision, variant=variant, vae=vae,
                         components=components)


def generate_validation(
    pipe,
    settings: SampleSettings,
    *,
    adapter_name: str = "default",
    batch_size: int = 1,
) -> list[Image.Image]:
    """Sample from models in training: eval mode (no dropout, no Flat-LoRA noise), adapter at scale 1.

    Each model's train/eval mode is restored afterwards, so the training loop continues unchanged.
    """
    models = [module for module in pipe.components.values() if isinstance(module, nn.Module)]
    with _eval_mode(models):
        return generate(pipe, settings, adapters={adapter_name: 1.0}, batch_size=batch_size)


@contextmanager
def _eval_mode(models: Sequence[nn.Module]):
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def save_images(
    images: Sequence[Image.Image],
    out_dir: str | os.PathLike,
    stem: str,
    settings: SampleSettings,
    *,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``{stem}_{i:03d}.png`` files with the settings that regenerate each image as text chunks.

    Each file is written to a temporary name and renamed, so a crash never leaves a partial PNG.
    ``extra`` (e.g. ``{"adapters": {"dog": 1.0}, "base_model": ...}``) is added to the JSON chunk.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = out / f"{stem}_{index:03d}.png"
        save_image(image, path, pnginfo=settings.for_image(index).to_png_info(extra))
        paths.append(path)
    return paths
