"""The one place LoRA adapters are written and read.

A trainer output folder holds::

    pytorch_lora_weights.safetensors        # diffusers format: `pipe.load_lora_weights(folder)` loads it
    pytorch_lora_weights_kohya.safetensors  # optional, for A1111 / ComfyUI (SD, SDXL, FLUX)
    adapter_info.json                       # the same facts as the weights' metadata, for people and tools
    README.md                               # model card

The weights file carries two metadata entries: diffusers' ``lora_adapter_metadata`` (each
component's peft ``LoraConfig``: rank, alpha, targets, DoRA; used by ``load_lora_weights`` so a
reload is exact) and ``flatlora_diffusion`` (JSON of :class:`AdapterInfo`: base model, model type,
prediction type, the LoRA and Flat-LoRA settings, the training facts). Only safetensors files are
read; pickle files are refused.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlora_diffusion import files
from flatlora_diffusion.quiet import no_lora_keys_notice

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
INFO_NAME = "adapter_info.json"
CARD_NAME = "README.md"
METADATA_KEY = "flatlora_diffusion"
FORMAT_VERSION = 1
# peft adapter names become module-dict keys: no dots, no path separators.
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SIZE_MISMATCH = ("size mismatch", "shape")  # in torch's and peft's load errors


class AdapterError(ValueError):
    """An adapter folder that cannot be read or does not fit the pipeline; the message says why."""


@dataclass
class AdapterInfo:
    """What a trainer output folder holds, read from its weights' metadata."""

    path: Path
    name: str
    model_type: str | None = None  # "sd" | "sdxl" | "sd3" | "flux"; None for adapters made by other tools
    base_model: str | None = None
    prediction_type: str | None = None
    cross_attention_dim: int | None = None
    components: dict[str, dict[str, Any]] = field(default_factory=dict)  # per component: rank, alpha, targets, dora
    lora: dict[str, Any] = field(default_factory=dict)  # the trainer's LoRA settings, verbatim
    flat_lora: dict[str, Any] | None = None  # FlatLoraConfig.to_dict(); None: plain LoRA
    training: dict[str, Any] = field(default_factory=dict)  # instance_prompt, steps, seed, lr, ...
    kohya_file: Path | None = None
    validation_images: list[Path] = field(default_factory=list)

    @property
    def denoiser(self) -> dict[str, Any]:
        """The summary of the denoiser's adapter (the UNet's or the transformer's)."""
        return self.components.get("unet") or self.components.get("transformer") or {}

    @property
    def rank(self) -> int | None:
        """LoRA rank of the denoiser adapter."""
        return self.denoiser.get("rank")

    @property
    def alpha(self) -> float | None:
        """LoRA alpha of the denoiser adapter."""
        return self.denoiser.get("alpha")

    @property
    def dora(self) -> bool:
        """Whether the denoiser adapter is DoRA."""
        return bool(self.denoiser.get("dora", False))

    @property
    def rho(self) -> float:
        """Flat-LoRA ρ (0 for plain LoRA)."""
        return float((self.flat_lora or {}).get("rho", 0.0))

    @property
    def schedule(self) -> str | None:
        """Flat-LoRA noise schedule (None for plain LoRA)."""
        return (self.flat_lora or {}).get("schedule") if self.rho else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; paths inside the folder are relative to it."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["kohya_file"] = self.kohya_file.name if self.kohya_file else None
        data["validation_images"] = [_relative(p, self.path) for p in self.validation_images]
        return data

    def _facts(self) -> dict[str, Any]:
        """What is stored in the weights' metadata (no location-dependent fields)."""
        data = self.to_dict()
        for key in ("path", "name", "validation_images"):
            data.pop(key)
        return {"format_version": FORMAT_VERSION, **data}


# Model type -> (LoRA loader mixin of diffusers.loaders, the pipeline of its model card).
MODEL_TYPES = {
    "sdxl": ("StableDiffusionXLLoraLoaderMixin", "StableDiffusionXLPipeline"),
    "sd": ("StableDiffusionLoraLoaderMixin", "StableDiffusionPipeline"),
    "sd3": ("SD3LoraLoaderMixin", "StableDiffusion3Pipeline"),
    "flux": ("FluxLoraLoaderMixin", "FluxPipeline"),
}
MODEL_TYPE_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX"}


def model_type_of(pipeline_or_class) -> str:
    """``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` for a diffusers pipeline (instance or class), by its LoRA loader."""
    from diffusers import loaders

    cls = pipeline_or_class if isinstance(pipeline_or_class, type) else type(pipeline_or_class)
    for model_type, (mixin, _) in MODEL_TYPES.items():  # SDXL first: its loader is not an SD loader, but be safe
        if issubclass(cls, getattr(loaders, mixin)):
            return model_type
    raise AdapterError(f"`{cls.__name__}` is not a Stable Diffusion, SDXL, SD3 or FLUX pipeline; only those are "
                       "supported.")


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """The pipeline's denoiser and its component name: ``("unet", pipe.unet)`` or ``("transformer", ...)``."""
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None:
            return name, model
    raise AdapterError(f"`{type(pipe).__name__}` has neither a UNet nor a transformer to load LoRA into.")


def save_adapter(
    output_dir: str | os.PathLike,
    *,
    pipeline_class: type,
    denoiser: tuple[str, nn.Module],
    text_encoders: Mapping[str, nn.Module] | None = None,
    base_model: str,
    prediction_type: str,
    lora_config: Mapping[str, Any],
    flat_lora: Mapping[str, Any] | None,
    training: Mapping[str, Any],
    kohya: bool = False,
    adapter_name: str = "default",
    published_as: str | os.PathLike | None = None,
) -> AdapterInfo:
    """Write the LoRA adapter ``adapter_name`` of the denoiser (and of any LoRA-wrapped text encoders).

    ``denoiser`` is ``("unet", unet)`` or ``("transformer", transformer)``. ``text_encoders`` maps
    pipeline component names to modules (``{"text_encoder": te}`` or, for SDXL and SD3, also
    ``"text_encoder_2"``); those without the adapter are skipped. ``lora_config`` (the
    trainer's LoRA settings), ``flat_lora`` (``FlatLoraConfig.to_dict()`` or None) and ``training``
    (``instance_prompt``, ``steps``, ``seed``, ...) are stored verbatim. ``kohya`` also writes
    :data:`KOHYA_WEIGHTS_NAME` (SD, SDXL, FLUX). Pass unwrapped models (``accelerator.unwrap_model``), not DDP or
    compiled wrappers. Each file is written atomically, the weights first. ``published_as``: the
    folder's final path when ``output_dir`` is a temporary one renamed later (for the recorded path).
    """
    from peft.utils import get_peft_model_state_dict

    denoiser_name, model = denoiser
    models = {denoiser_name: model,
              **{name: te for name, te in (text_encoders or {}).items() if _has_adapter(te, adapter_name)}}
    if not _has_adapter(model, adapter_name):
        raise AdapterError(f"The {denoiser_name} has no LoRA adapter `{adapter_name}` to save; add it with "
                           f"`{denoiser_name}.add_adapter`.")
    accepted = inspect.signature(pipeline_class.save_lora_weights).parameters
    for name in models:
        if f"{name}_lora_layers" not in accepted:
            raise AdapterError(f"`{pipeline_class.__name__}` has no component `{name}`; "
                               f"text encoders must be named {[p[:-12] for p in accepted if p.endswith('_lora_layers')]}.")
    peft_states = {name: get_peft_model_state_dict(model, adapter_name=adapter_name) for name, model in models.items()}
    configs = {name: _config_dict(model, adapter_name) for name, model in models.items()}
    if kohya and any(cfg.get("use_dora") for cfg in configs.values()):
        raise AdapterError("`--output_kohya_format` does not support DoRA adapters (`--use_dora`); drop one of them.")
    model_type = model_type_of(pipeline_class)
    if kohya and model_type not in KOHYA_PREFIXES:
        raise AdapterError(f"`--output_kohya_format`: there is no kohya format for {MODEL_TYPE_NAMES[model_type]} "
                           "LoRAs that diffusers reads back. Drop the flag and use `pytorch_lora_weights.safetensors`.")
    out = Path(output_dir)
    location = Path(published_as or out).resolve()
    info = AdapterInfo(
        path=location,
        name=location.name,
        model_type=model_type,
        base_model=str(base_model),
        prediction_type=prediction_type,
        cross_attention_dim=getattr(getattr(model, "config", None), "cross_attention_dim", None),
        components={name: _component_summary(cfg) for name, cfg in configs.items()},
        # Through JSON now, so the returned info equals what `read_adapter_info` gives back.
        lora=json.loads(_to_json(dict(lora_config))),
        flat_lora=json.loads(_to_json(dict(flat_lora))) if flat_lora is not None else None,
        training=json.loads(_to_json(dict(training))),
        kohya_file=location / KOHYA_WEIGHTS_NAME if kohya else None,
    )
    # diffusers writes the weights into a scratch folder; each final file is then written atomically,
    # the weights first: they are the source of truth, the sidecar only mirrors them.
    with files.scratch_dir(out / "adapter") as tmp:
        pipeline_class.save_lora_weights(
            tmp,
            **{f"{name}_lora_layers": file_state_dict(state, model_type) for name, state in peft_states.items()},
            **{f"{name}_lora_adapter_metadata": cfg for name, cfg in configs.items()},
        )
        _copy_with_metadata(tmp / WEIGHTS_NAME, out / WEIGHTS_NAME, {METADATA_KEY: _to_json(info._facts())})
    if kohya:
        _save_kohya(out / KOHYA_WEIGHTS_NAME, peft_states, models, adapter_name, info, KOHYA_PREFIXES[model_type])
    else:  # a kohya file of an earlier save would no longer match the weights
        (out / KOHYA_WEIGHTS_NAME).unlink(missing_ok=True)
    files.write_text(out / INFO_NAME, _to_json(info.to_dict(), indent=2) + "\n")
    return info


def file_state_dict(peft_state: Mapping[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """A component's peft LoRA state under the names of the weights file, the same tensors.

    SD/SDXL files use diffusers' names (``to_q.lora.down.weight``, as its SD/SDXL scripts write);
    SD3/FLUX files keep peft's (``lora_A``/``lora_B``), as diffusers' SD3/FLUX scripts write and
    their loaders expect.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(dict(peft_state)) if model_type in ("sd", "sdxl") else dict(peft_state)


def _has_adapter(model: nn.Module, adapter_name: str) -> bool:
    return adapter_name in (getattr(model, "peft_config", None) or {})


def _config_dict(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """The peft ``LoraConfig`` as JSON-ready kwargs (sets become sorted lists)."""
    config = model.peft_config[adapter_name].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def _component_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    targets = config.get("target_modules")
    return {
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "target_modules": [targets] if isinstance(targets, str) else list(targets or []),
        "dora": bool(config.get("use_dora")),
        "rslora": bool(config.get("use_rslora")),
    }


def _copy_with_metadata(source: Path, dest: Path, extra: Mapping[str, str]) -> None:
    """Write the safetensors file ``source`` to ``dest`` with ``extra`` added to its header metadata."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    files.save_safetensors(tensors, dest, {**metadata, **extra})


# Model type -> key prefix per component in the kohya file. SD 1.x/2.x tools read `lora_te_`, SDXL
# ones `lora_te1_`/`lora_te2_`. FLUX: kohya-style keys on diffusers' module names (`lora_transformer_`,
# `lora_te1_` for CLIP), the variant diffusers' `FluxLoraLoaderMixin` converts back
# (`_convert_kohya_flux_lora_to_diffusers`); diffusers has no converter for SD3 kohya files.
KOHYA_PREFIXES = {
    "sd": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    "flux": {"transformer": "lora_transformer_", "text_encoder": "lora_te1_"},
}


# What `convert_state_dict_to_kohya` makes of each component's name.
_CONVERTER_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
                       "transformer": "transformer_"}


def _save_kohya(path: Path, peft_states, models, adapter_name: str, info: AdapterInfo,
                prefixes: Mapping[str, str]) -> None:
    """A1111/ComfyUI format via diffusers' converter, with each module's real alpha.

    ``convert_state_dict_to_kohya`` writes ``alpha = rank`` for every module, which changes the
    LoRA scale whenever ``lora_alpha != r``; the true value is ``scaling · r`` of each peft layer.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.tuners.lora import LoraLayer

    kohya_state = {}
    for name, state in peft_states.items():  # one component at a time, then its converter prefix replaced by ours
        converted = convert_state_dict_to_kohya({f"{name}.{key}": value for key, value in state.items()})
        prefix = _CONVERTER_PREFIXES[name]
        for key, value in converted.items():
            module = key.removeprefix(prefix)
            if name.startswith("text_encoder") and not module.startswith("text_model_"):
                module = "text_model_" + module  # transformers 5 dropped CLIP's `text_model.`; kohya names keep it
            kohya_state[prefixes[name] + module] = value
    for name, model in models.items():
        prefix = prefixes[name]
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.scaling:
                if name.startswith("text_encoder") and not module_name.startswith("text_model."):
                    module_name = "text_model." + module_name
                key = f"{prefix}{module_name.replace('.', '_')}.alpha"
                if key not in kohya_state:
                    raise AdapterError(f"Kohya export: no entry for `{module_name}` of the {name} (expected `{key}`).")
                alpha = module.scaling[adapter_name] * module.r[adapter_name]
                kohya_state[key] = torch.tensor(float(alpha))
    metadata = {"ss_network_module": "networks.lora", METADATA_KEY: _to_json(info._facts())}
    files.save_safetensors(kohya_state, path, metadata)


def read_adapter_info(adapter_dir: str | os.PathLike) -> AdapterInfo:
    """Validate an adapter folder and read its :class:`AdapterInfo` (the header only, no tensors).

    Adapters made by other tools (no ``flatlora_diffusion`` metadata) are accepted with the fields
    that can be read from diffusers' metadata; the rest stay ``None``.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterError(f"Adapter folder `{folder}` does not exist (or is not a folder); pass a trainer `--output_dir`.")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors"))
        hint = (f" Found {others}: only `{WEIGHTS_NAME}` is read (pickle files are never loaded, for safety)."
                if others else "")
        raise AdapterError(f"`{folder}` holds no `{WEIGHTS_NAME}`; it is not a LoRA adapter folder.{hint}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"`{weights}` is not a valid safetensors file ({err}); re-save or re-train the adapter.") from err
    try:
        facts = json.loads(metadata.get(METADATA_KEY, "{}"))
        lora_metadata = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError as err:
        raise AdapterError(f"`{weights}` has corrupt metadata ({err}); re-save the adapter.") from err
    if facts.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise AdapterError(f"`{weights}` was written by a newer flatlora_diffusion (format "
                           f"{facts['format_version']}); upgrade the package to read it.")
    facts.pop("format_version", None)
    if not facts:
        facts = _foreign_facts(keys, lora_metadata)
    kohya_name = facts.pop("kohya_file", None)
    try:
        info = AdapterInfo(path=folder.resolve(), name=folder.resolve().name, **facts)
    except TypeError as err:
        raise AdapterError(f"`{weights}` has unexpected metadata ({err}); re-save the adapter.") from err
    if kohya_name and (folder / kohya_name).is_file():
        info.kohya_file = folder.resolve() / kohya_name
    info.validation_images = _sidecar_images(folder)
    return info


def _foreign_facts(keys: Sequence[str], lora_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What can be told about an adapter written by another tool."""
    components = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if any(key.startswith(f"{name}.") for key in keys):
            config = {k[len(name) + 1:]: v for k, v in lora_metadata.items() if k.startswith(f"{name}.")}
            components[name] = _component_summary(config) if "r" in config else {}
    model_type = "sdxl" if "text_encoder_2" in components else None  # SD cannot be told from SDXL by UNet keys alone
    return {"components": components, "model_type": model_type}


def _sidecar_images(folder: Path) -> list[Path]:
    """Validation images listed in the sidecar (existing files inside the folder only)."""
    try:
        listed = json.loads((folder / INFO_NAME).read_text(encoding="utf-8")).get("validation_images", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    root = folder.resolve()
    images = [(folder / rel).resolve() for rel in listed if isinstance(rel, str)]
    return [p for p in images if p.is_file() and p.is_relative_to(root)]


def find_adapters(roots: Iterable[str | os.PathLike], *, max_depth: int = 4,
                  skipped: list[tuple[Path, str]] | None = None) -> list[AdapterInfo]:
    """Every adapter folder under ``roots`` (up to ``max_depth`` levels down), sorted by name.

    Symlinks are resolved and anything that leads outside its root is skipped, as are hidden
    folders and unreadable adapters (with a warning). Names are the folder's path relative to its
    root, made safe as adapter names (``runs/dog`` -> ``runs_dog``) and unique. ``skipped``, if
    given, receives ``(folder, reason)`` for each unreadable adapter (the app lists them).
    """
    found: list[AdapterInfo] = []
    names: set[str] = set()
    for root in roots:
        base = Path(root).resolve()
        if not base.is_dir():
            raise AdapterError(f"Adapter root `{root}` does not exist or is not a folder.")
        for folder in _walk(base, max_depth):
            weights = folder / WEIGHTS_NAME
            if not weights.is_file() or not weights.resolve().is_relative_to(base):
                continue
            try:
                info = read_adapter_info(folder)
            except AdapterError as err:
                logger.warning("Skipping adapter `%s`: %s", folder, err)
                if skipped is not None:
                    skipped.append((folder, str(err)))
                continue
            rel = folder.relative_to(base).as_posix()
            info.name = _unique(adapter_name_for(base.name if rel == "." else rel), names)
            found.append(info)
    return sorted(found, key=lambda info: info.name)


def _walk(base: Path, max_depth: int) -> Iterable[Path]:
    """Folders under ``base`` (itself included) whose real path stays inside ``base``."""
    stack = [(base, 0)]
    while stack:
        folder, depth = stack.pop()
        yield folder
        if depth == max_depth:
            continue
        try:
            children = sorted(folder.iterdir())
        except OSError:
            continue
        for child in children:
            if child.name.startswith(".") or not child.is_dir():
                continue
            real = child.resolve()
            if not real.is_relative_to(base):
                logger.warning("Skipping `%s`: it links outside the adapter root `%s`.", child, base)
                continue
            stack.append((child, depth + 1))


def adapter_name_for(text: str) -> str:
    """A valid adapter name from a label or path: unsafe characters become ``_``."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:64]
    return name or "adapter"


def _unique(name: str, taken: set[str]) -> str:
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name[:60]}_{index}", index + 1
    taken.add(candidate)
    return candidate


def load_adapter(pipe, adapter_dir: str | os.PathLike, adapter_name: str) -> AdapterInfo:
    """Load an adapter folder into ``pipe`` as ``adapter_name`` through ``pipe.load_lora_weights``.

    Refuses, with :class:`AdapterError`, adapters trained for another architecture (any two of SD,
    SDXL, SD3 and FLUX, or another cross-attention width such as SD 1.x vs 2.x); the pipeline is
    left unchanged.
    """
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
        raise AdapterError(f"Adapter name {adapter_name!r} is invalid: use 1-64 letters, digits, `_` or `-`.")
    info = read_adapter_info(adapter_dir)
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    if adapter_name in loaded:
        raise AdapterError(f"An adapter named `{adapter_name}` is already loaded; choose another name "
                           "or remove it with `pipe.delete_adapters`.")
    pipe_type = model_type_of(pipe)
    if info.model_type is not None and info.model_type != pipe_type:
        trained, here = MODEL_TYPE_NAMES.get(info.model_type, info.model_type), MODEL_TYPE_NAMES[pipe_type]
        raise AdapterError(f"Adapter `{info.path}` was trained for {trained} (base `{info.base_model}`) but the "
                           f"pipeline is {here}; load it into a {trained} pipeline.")
    pipe_dim = getattr(denoiser_of(pipe)[1].config, "cross_attention_dim", None)
    if info.cross_attention_dim is not None and info.cross_attention_dim != pipe_dim:
        raise AdapterError(f"Adapter `{info.path}` was trained on a UNet with cross-attention width "
                           f"{info.cross_attention_dim} (base `{info.base_model}`), but this pipeline's is {pipe_dim} "
                           "(e.g. SD 1.x is 768, SD 2.x 1024); use the base model it was trained on.")
    shapes = _weight_shapes(info.path / WEIGHTS_NAME)
    problems = _shape_problems(pipe, shapes)
    if problems:  # before diffusers: it would warn about every layer, then fail on the first
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterError(f"Could not load adapter `{info.path}`: its layer shapes do not match this pipeline's "
                           f"model (another architecture?): {'; '.join(problems[:3])}{more}.")
    try:
        with no_lora_keys_notice(_components_without_weights(pipe, shapes)):
            # Exactly the file checked above: without `weight_name`, diffusers picks any
            # `*pytorch_lora_weights.safetensors` in the folder (a symlink planted beside it, say).
            pipe.load_lora_weights(str(info.path), weight_name=WEIGHTS_NAME, use_safetensors=True,
                                   adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        _discard(pipe, adapter_name)
        mismatch = any(marker in str(err) for marker in _SIZE_MISMATCH)
        reason = "its layer shapes do not match this pipeline's model (another architecture?)" if mismatch else str(err)
        raise AdapterError(f"Could not load adapter `{info.path}`: {reason}.") from err
    if adapter_name not in {name for names in pipe.get_list_adapters().values() for name in names}:
        raise AdapterError(f"Adapter `{info.path}` has no layer that matches this pipeline's model; "
                           "it was made for another architecture.")
    return info


def _weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _shape_problems(pipe, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Denoiser layers of the file (``unet.<layer>.lora.down.weight``, ``transformer.<layer>.lora_A.weight``)
    missing or of other widths.

    down/A is (rank, inputs[, k, k]) and up/B (outputs, rank[, 1, 1]), like the layer's own weight
    (outputs, inputs[, k, k]). A wrong architecture always shows in the denoiser; other keys are left to diffusers.
    """
    name, denoiser = denoiser_of(pipe)
    problems = []
    for key, shape in shapes.items():
        if not key.startswith(f"{name}."):
            continue
        for markers, dim, what in (((".lora.down.", ".lora_A."), 1, "inputs"), ((".lora.up.", ".lora_B."), 0, "outputs")):
            marker = next((m for m in markers if m in key), None)
            if marker is None:
                continue
            layer = key.removeprefix(f"{name}.").split(marker)[0]
            try:
                width = denoiser.get_submodule(layer).weight.shape[dim]  # a peft-wrapped layer: its base weight
            except AttributeError:
                problems.append(f"layer `{name}.{layer}` does not exist here")
                continue
            if len(shape) > dim and shape[dim] != width:
                problems.append(f"`{name}.{layer}` has {shape[dim]} {what} in the adapter, {width} here")
    return problems


def _components_without_weights(pipe, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The pipeline's text encoders the file has no weights for (none when it is in kohya format)."""
    if any(key.startswith("lora_te") for key in shapes):
        return []
    return [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(pipe, name, None) is not None and not any(key.startswith(f"{name}.") for key in shapes)]


def _discard(pipe, adapter_name: str) -> None:
    """Remove what a failed load may have added, so the pipeline is as before."""
    for component, names in pipe.get_list_adapters().items():
        if adapter_name in names:
            try:
                pipe.delete_adapters(adapter_name)
            except ValueError as err:  # diffusers refuses a component that lacks it: say so, go on
                logger.warning("Could not remove adapter `%s` from %s: %s", adapter_name, component, err)
            return


def write_model_card(
    output_dir: str | os.PathLike,
    info: AdapterInfo,
    validation_images: Sequence[str | os.PathLike] = (),
    hub_repo: str | None = None,
) -> Path:
    """Write ``README.md`` (and record ``validation_images`` in ``adapter_info.json``), atomically.

    Its "How to use" loads the adapter from ``hub_repo`` when given (the card is uploaded there),
    else from this folder's absolute path."""
    out = Path(output_dir).resolve()
    images = [Path(p).resolve() for p in validation_images]
    outside = [str(p) for p in images if not p.is_relative_to(out)]
    if outside:
        raise AdapterError(f"Validation images must be inside `{out}` to be shown in the model card: {outside}.")
    info.validation_images = images
    files.write_text(out / INFO_NAME, _to_json(info.to_dict(), indent=2) + "\n")
    return files.write_text(out / CARD_NAME, _card_text(info, hub_repo or str(out)))


def _how_to_use(info: AdapterInfo, pipeline: str, adapter: str) -> list[str]:
    """Python that runs when copied: the base by an id `from_pretrained` takes, a dtype that fits the device."""
    base = info.base_model or "BASE_MODEL"
    builtin = base.startswith(("toy:", "tiny:"))  # flatlora_diffusion's ids: resolved to their local folder
    half = "bfloat16" if info.model_type in ("sd3", "flux") else "float16"  # FLUX overflows fp16
    return [
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        *(["from flatlora_diffusion.model_ids import resolve_model_id  # `toy:`/`tiny:` ids -> local folder"]
          if builtin else []),
        "",
        "device = \"cuda\" if torch.cuda.is_available() else \"cpu\"",
        f"dtype = torch.{half} if device == \"cuda\" else torch.float32  # half precision needs a GPU",
        f"pipe = {pipeline}.from_pretrained({f'resolve_model_id({base!r})' if builtin else repr(base)}, "
        "torch_dtype=dtype).to(device)",
        f"pipe.load_lora_weights({adapter!r})",
        f"image = pipe({info.training.get('instance_prompt') or 'your prompt'!r}).images[0]",
        "image.save(\"sample.png\")",
        "```",
    ]


def _is_hub_id(name: str | None) -> bool:
    """Whether ``name`` looks like a Hub model id (`owner/name`), not a local folder or a built-in id."""
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


def _card_text(info: AdapterInfo, adapter: str) -> str:
    prompt = info.training.get("instance_prompt", "")
    pipeline = MODEL_TYPES.get(info.model_type or "", (None, "DiffusionPipeline"))[1]
    method = f"Flat-LoRA (ρ = {info.rho}, {info.schedule} schedule)" if info.rho else "LoRA"
    rows = [
        ("Base model", f"`{info.base_model}`"),
        ("Model type", MODEL_TYPE_NAMES.get(info.model_type or "", "?")),
        ("Prediction type", info.prediction_type),
        ("Instance prompt", f"`{prompt}`" if prompt else "—"),
        ("Method", method),
        ("Flat-LoRA ρ", info.rho),
        ("Flat-LoRA schedule", info.schedule or "—"),
        *[(f"{name}: rank / alpha", f"{c.get('rank')} / {c.get('alpha')}" + (" (DoRA)" if c.get("dora") else ""))
          for name, c in info.components.items()],
        ("Denoiser targets", ", ".join(f"`{t}`" for t in info.denoiser.get("target_modules", []))),
        *[(key.replace("_", " ").capitalize(), value) for key, value in sorted(info.training.items())
          if key != "instance_prompt"],
    ]
    lines = [
        "---",
        *([f"base_model: {json.dumps(info.base_model)}"] if _is_hub_id(info.base_model) else []),
        "library_name: diffusers",
        "tags: [text-to-image, diffusers, lora, dreambooth, flat-lora]",
        f"instance_prompt: {json.dumps(prompt)}",
        "---",
        "",
        f"# {info.name}: {method} DreamBooth adapter",
        "",
        f"A LoRA adapter for `{info.base_model}` trained with flatlora_diffusion.",
        "",
        "| Setting | Value |",
        "|---|---|",
        *[f"| {key} | {_cell(value)} |" for key, value in rows],
        "",
        "## How to use",
        "",
        *_how_to_use(info, pipeline, adapter),
        "",
    ]
    if info.kohya_file:
        lines += [f"`{info.kohya_file.name}` is the same adapter in kohya format (A1111, ComfyUI).", ""]
    if info.validation_images:
        lines += ["## Validation images", "",
                  *[f"![validation {i}]({_relative(p, info.path)})" for i, p in enumerate(info.validation_images)], ""]
    return "\n".join(lines)


def _to_json(data: Any, indent: int | None = None) -> str:
    """JSON with sets as sorted lists and paths (or other objects) as strings."""
    def default(value: Any) -> Any:
        return sorted(value) if isinstance(value, (set, frozenset)) else str(value)

    return json.dumps(data, indent=indent, sort_keys=True, default=default)


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _relative(path: Path, root: Path) -> str:
    return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
