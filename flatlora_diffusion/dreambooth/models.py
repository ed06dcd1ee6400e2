"""The model-specific pieces of DreamBooth training: SD 1.x/2.x, SDXL, SD3/3.5 and FLUX.1.

Every family trains through one loop; a `ModelFamily` holds only what differs:

* the denoiser component (`unet` or `transformer`) and how it is called (`predict`): SDXL adds its
  micro-conditioning (`time_ids` from original size, crop, target size); FLUX packs the latents
  into 2x2 patches with their position ids and takes a guidance embedding;
* how prompts are encoded (`encode`): SD the last hidden state of one CLIP encoder; SDXL the
  penultimate states of two CLIP encoders and the second one's pooled projection; SD3 those of two
  CLIP encoders padded to T5's width followed by T5's tokens; FLUX T5's tokens and CLIP's pooled output;
* the training objective (`objective`): DDPM noise/velocity prediction or rectified flow matching
  (`flatlora_diffusion.dreambooth.objectives`), and which text encoders may get LoRA (never T5);
* whether the VAE stays in fp32 under mixed precision (the stock SDXL VAE overflows in fp16; SD3's
  is kept in fp32 as diffusers' script does).

The family is read from the pipeline's ``model_index.json`` (`_class_name`), and every component is
loaded with ``from_pretrained`` through the class named there, as diffusers' own loader does.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flatlora_diffusion.model_ids import ModelIdError, resolve_model_id


class ModelError(ValueError):
    """The base model cannot be used; the message names the flag, the value and the fix."""


# ---------------------------------------------------------------------------------------------
# Prompt encoding (one function per family)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded/truncated to ``max_length`` (default the tokenizer's, CLIP: 77), shape (B, L)."""
    return tokenizer(list(prompts), padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _pooled(output) -> torch.Tensor:
    """The pooled embedding of a CLIP output: the projection (`WithProjection` models) or the pooler output."""
    return output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output


def _clip_penultimate(encoder, tokenizer, prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
    return out.hidden_states[-2], _pooled(out)  # (B, 77, D), (B, P)


def _t5(encoder, tokenizer, prompts, device, max_sequence_length: int) -> torch.Tensor:
    return encoder(tokenize(tokenizer, prompts, max_sequence_length).to(device))[0]  # (B, L, D_t5)


def _encode_sd(text_encoders, tokenizers, prompts, device, max_sequence_length) -> tuple[torch.Tensor, None]:
    (encoder,), (tokenizer,) = text_encoders, tokenizers
    return encoder(tokenize(tokenizer, prompts).to(device)).last_hidden_state, None  # (B, 77, D)


def _encode_sdxl(text_encoders, tokenizers, prompts, device, max_sequence_length) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_clip_penultimate(e, t, prompts, device) for e, t in zip(text_encoders, tokenizers, strict=True)]
    return torch.cat([hidden for hidden, _ in pairs], dim=-1), pairs[-1][1]  # (B, 77, D_1 + D_2), (B, P_2)


def _encode_sd3(text_encoders, tokenizers, prompts, device, max_sequence_length) -> tuple[torch.Tensor, torch.Tensor]:
    """As `StableDiffusion3Pipeline.encode_prompt` (no clip skip): (B, 77 + L, D_t5), (B, P_1 + P_2)."""
    *clips, t5 = text_encoders
    *clip_tokenizers, t5_tokenizer = tokenizers
    pairs = [_clip_penultimate(e, t, prompts, device) for e, t in zip(clips, clip_tokenizers, strict=True)]
    clip = torch.cat([hidden for hidden, _ in pairs], dim=-1)
    t5_embeds = _t5(t5, t5_tokenizer, prompts, device, max_sequence_length)
    clip = F.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_embeds.to(clip.dtype)], dim=-2), torch.cat([pooled for _, pooled in pairs], dim=-1)


def _encode_flux(text_encoders, tokenizers, prompts, device, max_sequence_length) -> tuple[torch.Tensor, torch.Tensor]:
    """As `FluxPipeline.encode_prompt`: T5's tokens (B, L, D_t5) and CLIP's pooled output (B, D_clip)."""
    (clip, t5), (clip_tokenizer, t5_tokenizer) = text_encoders, tokenizers
    pooled = clip(tokenize(clip_tokenizer, prompts).to(device)).pooler_output
    return _t5(t5, t5_tokenizer, prompts, device, max_sequence_length), pooled


# ---------------------------------------------------------------------------------------------
# Calling the denoiser (one function per family)


@dataclass
class DenoiserInput:
    """What the denoiser of any family is called with in training."""

    noisy: torch.Tensor  # (B, C, h, w) noisy latents
    timesteps: torch.Tensor  # (B,): DDPM integer steps, or flow-matching timesteps in [0, 1000]
    embeds: torch.Tensor  # (B, L, D) prompt embeddings
    pooled: torch.Tensor | None  # (B, P) pooled prompt embeddings (SDXL, SD3, FLUX)
    batch: dict = field(default_factory=dict)  # the data batch (SDXL's original sizes and crops)
    guidance_scale: float | None = None  # FLUX.1-dev's guidance embedding


def _predict_sd(model, x: DenoiserInput) -> torch.Tensor:
    return model(x.noisy, x.timesteps, x.embeds).sample


def time_ids(original_sizes: Sequence[Sequence[int]], crops_top_left: Sequence[Sequence[int]],
             target_size: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL micro-conditioning, one row per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    rows = [[*map(int, orig), *map(int, crop), *map(int, target_size)]
            for orig, crop in zip(original_sizes, crops_top_left, strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)  # (B, 6)


def _predict_sdxl(model, x: DenoiserInput) -> torch.Tensor:
    target_size = x.noisy.shape[-2] * 8, x.noisy.shape[-1] * 8
    ids = time_ids(x.batch["original_sizes"], x.batch["crop_top_lefts"], target_size, x.noisy.device, x.embeds.dtype)
    return model(x.noisy, x.timesteps, x.embeds, added_cond_kwargs={"text_embeds": x.pooled, "time_ids": ids}).sample


def _predict_sd3(model, x: DenoiserInput) -> torch.Tensor:
    return model(hidden_states=x.noisy, timestep=x.timesteps, encoder_hidden_states=x.embeds,
                 pooled_projections=x.pooled, return_dict=False)[0]


def _predict_flux(model, x: DenoiserInput) -> torch.Tensor:
    """FLUX takes 2x2-packed latents (B, h/2 * w/2, 4C) with their position ids, and timesteps in [0, 1]."""
    from diffusers import FluxPipeline

    b, c, h, w = x.noisy.shape
    packed = FluxPipeline._pack_latents(x.noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.noisy.device, x.noisy.dtype)
    txt_ids = torch.zeros(x.embeds.shape[1], 3, device=x.noisy.device, dtype=x.noisy.dtype)
    guidance = None
    if x.guidance_scale is not None:
        guidance = torch.full((b,), float(x.guidance_scale), device=x.noisy.device)
    pred = model(hidden_states=packed, timestep=x.timesteps / 1000, guidance=guidance, pooled_projections=x.pooled,
                 encoder_hidden_states=x.embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(pred, h * 8, w * 8, 8)  # (B, C, h, w)


# ---------------------------------------------------------------------------------------------
# The families

# The attention projections of diffusers' attention blocks; the joint-attention (MM-DiT) blocks of
# SD3 and FLUX also project the text stream (`add_*`, `to_add_out`).
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_ATTENTION = (*UNET_ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class ModelFamily:
    """What differs between the families' training."""

    name: str
    pipeline_class: str
    denoiser: str  # component name of the denoiser in model_index.json: `unet` or `transformer`
    text_encoders: tuple[str, ...]  # component names, in the order `encode` takes them
    tokenizers: tuple[str, ...]
    encode: Callable  # (text_encoders, tokenizers, prompts, device, max_sequence_length) -> (embeds, pooled | None)
    predict: Callable[[nn.Module, DenoiserInput], torch.Tensor]  # the denoiser's output, (B, C, h, w)
    objective: str  # `ddpm` (noise / velocity prediction) or `flow_matching`
    scheduler_class: str  # diffusers class of the training noise scheduler
    vae_fp32: bool  # keep the stock VAE in fp32 under mixed precision
    lora_targets: tuple[str, ...] = UNET_ATTENTION  # default `--lora_target_modules`
    trainable_text_encoders: tuple[str, ...] | None = None  # LoRA with `--train_text_encoder`; None: all
    latent_packing: int = 1  # latent pixels per denoiser token side (FLUX packs 2x2 patches)

    @property
    def lora_text_encoders(self) -> tuple[str, ...]:
        """The text encoders that get LoRA with `--train_text_encoder` (T5 never does, as in diffusers)."""
        return self.text_encoders if self.trainable_text_encoders is None else self.trainable_text_encoders

    def latent_channels(self, denoiser_config) -> int:
        """Latent channels the denoiser takes (FLUX's 64 input channels are 16 packed 2x2)."""
        return int(denoiser_config.in_channels) // self.latent_packing**2


FAMILIES = {
    "StableDiffusionPipeline": ModelFamily(
        "sd", "StableDiffusionPipeline", "unet", ("text_encoder",), ("tokenizer",), _encode_sd, _predict_sd,
        objective="ddpm", scheduler_class="DDPMScheduler", vae_fp32=False),
    "StableDiffusionXLPipeline": ModelFamily(
        "sdxl", "StableDiffusionXLPipeline", "unet", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
        _encode_sdxl, _predict_sdxl, objective="ddpm", scheduler_class="DDPMScheduler", vae_fp32=True),
    "StableDiffusion3Pipeline": ModelFamily(
        "sd3", "StableDiffusion3Pipeline", "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"),
        ("tokenizer", "tokenizer_2", "tokenizer_3"), _encode_sd3, _predict_sd3, objective="flow_matching",
        scheduler_class="FlowMatchEulerDiscreteScheduler", vae_fp32=True, lora_targets=JOINT_ATTENTION,
        trainable_text_encoders=("text_encoder", "text_encoder_2")),
    "FluxPipeline": ModelFamily(
        "flux", "FluxPipeline", "transformer", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
        _encode_flux, _predict_flux, objective="flow_matching", scheduler_class="FlowMatchEulerDiscreteScheduler",
        vae_fp32=False, lora_targets=JOINT_ATTENTION, trainable_text_encoders=("text_encoder",), latent_packing=2),
}


# ---------------------------------------------------------------------------------------------
# Finding and loading the pipeline


def resolve_model_path(name: str) -> str:
    """`tiny:`/`toy:` ids -> their local pipeline folder (`flatlora_diffusion.model_ids`); others unchanged."""
    try:
        return resolve_model_id(name, "--pretrained_model_name_or_path")
    except ModelIdError as err:
        raise ModelError(str(err)) from err


def read_model_index(path: str, revision: str | None = None, cache_dir: str | None = None) -> dict:
    """The pipeline's ``model_index.json``, from a local folder or the hub."""
    flag = "`--pretrained_model_name_or_path`"
    local = Path(path).expanduser()
    if local.is_file():
        raise ModelError(f"{flag} `{path}` is a single file; a diffusers pipeline folder (with `model_index.json`) "
                         "is expected. Convert it first: `StableDiffusionPipeline.from_single_file(FILE)"
                         ".save_pretrained(DIR)` (or `StableDiffusionXLPipeline` for SDXL).")
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelError(f"{flag} `{path}` is not a diffusers pipeline folder: `model_index.json` is missing. "
                             "Pass a folder written by `save_pretrained` (with `unet/`, `vae/`, `text_encoder/`, "
                             "...) or a hub id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`.")
        try:
            return json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelError(f"{flag}: `{index}` is not valid JSON ({err}); the model folder is damaged.") from err
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep in path.replace("/", ""):
        raise ModelError(f"{flag} `{path}` does not exist (as a local folder).")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir)
    except Exception as err:  # hub errors come in many types (offline, 404, gated, ...)
        raise ModelError(f"{flag} `{path}` is neither a local folder nor a reachable hub model "
                         f"(revision={revision!r}): {err}. Check the id, your network/`HF_TOKEN`, or pass a "
                         "local pipeline folder.") from err


def detect_family(index: dict, path: str) -> ModelFamily:
    """The `ModelFamily` of a pipeline from its model index (`_class_name`)."""
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ModelError(f"`--pretrained_model_name_or_path` `{path}` is a `{name}`; this trainer supports "
                         f"{', '.join(FAMILIES)} (SD 1.x/2.x, SDXL, SD3/3.5 and FLUX.1).")
    return FAMILIES[name]


def _component_class(index: dict, name: str, path: str):
    """The class model_index.json names for component ``name`` (e.g. transformers.CLIPTextModel)."""
    entry = index.get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise ModelError(f"`--pretrained_model_name_or_path` `{path}` has no `{name}` component in its "
                         "`model_index.json`; the pipeline is incomplete.")
    library, class_name = entry
    return getattr(importlib.import_module(library), class_name)


def _dtype_kwarg(cls) -> str:
    """transformers >= 4.56 spells it `dtype`; diffusers has long accepted `torch_dtype`."""
    return "dtype" if cls.__module__.startswith("transformers") else "torch_dtype"


def _from_pretrained(cls, source: str, flag: str, name: str, **kwargs):
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"`{flag}` `{source}`: cannot load `{name}` ({err}). Check the folder, `--revision` "
                         "and `--variant`.") from err


@dataclass
class Components:
    """The loaded parts of the pipeline, frozen (``requires_grad=False``) and in eval mode."""

    family: ModelFamily
    path: str  # resolved local folder or hub id
    index: dict
    tokenizers: list
    text_encoders: list[nn.Module]
    vae: nn.Module
    denoiser: nn.Module  # the UNet (SD, SDXL) or the transformer (SD3, FLUX)
    noise_scheduler: object
    max_sequence_length: int | None = None  # T5 tokens of SD3/FLUX prompts

    def encode_prompts(self, prompts: Sequence[str], text_encoders: dict[str, nn.Module] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D) text embeddings and the pooled (B, P) embeddings (None for SD).

        ``text_encoders`` replaces loaded ones by name, e.g. by their data-parallel wrappers in training.
        """
        replaced = text_encoders or {}
        encoders = [replaced.get(name, model) for name, model in zip(self.family.text_encoders, self.text_encoders,
                                                                      strict=True)]
        device = next(self.text_encoders[0].parameters()).device
        return self.family.encode(encoders, self.tokenizers, prompts, device, self.max_sequence_length)

    @property
    def text_encoder_map(self) -> dict[str, nn.Module]:
        """The text encoders by pipeline component name."""
        return dict(zip(self.family.text_encoders, self.text_encoders, strict=True))


def read_denoiser_config(path: str, index: dict, family: ModelFamily, revision: str | None = None,
                         cache_dir: str | None = None) -> dict:
    """The denoiser's ``config.json`` (no weights read), for checks before loading."""
    cls = _component_class(index, family.denoiser, path)
    try:
        return dict(cls.load_config(path, subfolder=family.denoiser, revision=revision, cache_dir=cache_dir))
    except (OSError, ValueError) as err:
        raise ModelError(f"`--pretrained_model_name_or_path` `{path}`: cannot read `{family.denoiser}/config.json` "
                         f"({err}).") from err


def load_components(path: str, *, revision: str | None, variant: str | None, cache_dir: str | None,
                    vae_path: str | None, prediction_type: str | None, weight_dtype: torch.dtype,
                    max_sequence_length: int | None = None) -> Components:
    """Load tokenizers, text encoders, VAE, denoiser and the training noise scheduler of the pipeline.

    Frozen weights are loaded in ``weight_dtype``; the VAE stays fp32 for SDXL and SD3 unless
    ``vae_path`` (e.g. an fp16-fixed VAE) is given.
    """
    import diffusers
    from diffusers import AutoencoderKL

    index = read_model_index(path, revision, cache_dir)
    family = detect_family(index, path)
    common = {"revision": revision, "cache_dir": cache_dir}

    def load(name: str, dtype: torch.dtype | None = None):
        """Component ``name`` through the class model_index.json names for it."""
        cls = _component_class(index, name, path)
        kwargs = common | {"subfolder": name}
        if dtype is not None:  # a model (tokenizers take neither a dtype nor a weight variant)
            kwargs |= {"variant": variant, _dtype_kwarg(cls): dtype}
        return _from_pretrained(cls, path, "--pretrained_model_name_or_path", name, **kwargs)

    tokenizers = [load(name) for name in family.tokenizers]
    text_encoders = [load(name, weight_dtype) for name in family.text_encoders]
    if vae_path is None:
        vae = load("vae", torch.float32 if family.vae_fp32 else weight_dtype)
    else:  # a separate VAE repo or folder (its own revision: the base's does not apply)
        vae = _from_pretrained(AutoencoderKL, vae_path, "--pretrained_vae_model_name_or_path", "vae",
                               cache_dir=cache_dir, torch_dtype=weight_dtype)
    denoiser = load(family.denoiser, weight_dtype)
    channels = family.latent_channels(denoiser.config)
    if channels != vae.config.latent_channels:
        raise ModelError(f"`--pretrained_model_name_or_path` `{path}`: the {family.denoiser} takes {channels} latent "
                         f"channels, not the VAE's {vae.config.latent_channels} (an inpainting or control model?); "
                         "use a text-to-image base model.")
    try:
        scheduler_class = getattr(diffusers, family.scheduler_class)
        noise_scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", **common)
    except OSError as err:
        raise ModelError(f"`--pretrained_model_name_or_path` `{path}`: cannot load `scheduler` ({err}).") from err
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    for model in (*text_encoders, vae, denoiser):
        model.requires_grad_(False).eval()
    return Components(family, path, index, tokenizers, text_encoders, vae, denoiser, noise_scheduler,
                      max_sequence_length)
