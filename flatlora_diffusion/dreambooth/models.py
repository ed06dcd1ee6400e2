"""The model-specific pieces of DreamBooth training: SD 1.x/2.x vs SDXL, and the diffusion loss.

SD and SDXL share one training path; they differ only in what a `ModelFamily` holds:

* how prompts are encoded (SD: the last hidden state of one CLIP encoder; SDXL: the penultimate
  hidden states of two encoders concatenated, plus the second encoder's pooled projection);
* whether the UNet takes SDXL's micro-conditioning (`time_ids` from original size, crop, target
  size) as ``added_cond_kwargs``;
* whether the VAE must stay in fp32 under mixed precision (the stock SDXL VAE overflows in fp16).

The family is read from the pipeline's ``model_index.json`` (`_class_name`), and every component is
loaded with ``from_pretrained`` through the class named there, as diffusers' own loader does.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flatlora_diffusion.model_ids import ModelIdError, resolve_model_id


class ModelError(ValueError):
    """The base model cannot be used; the message names the flag, the value and the fix."""


# ---------------------------------------------------------------------------------------------
# Prompt encoding (one function per family)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (CLIP: 77), shape (B, L)."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _encode_sd(text_encoders, tokenizers, prompts, device) -> tuple[torch.Tensor, None]:
    (encoder,), (tokenizer,) = text_encoders, tokenizers
    return encoder(tokenize(tokenizer, prompts).to(device)).last_hidden_state, None  # (B, 77, D)


def _encode_sdxl(text_encoders, tokenizers, prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = []
    for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        embeds.append(out.hidden_states[-2])  # (B, 77, D_i): SDXL uses the penultimate layer
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return torch.cat(embeds, dim=-1), pooled  # (B, 77, D_1 + D_2), (B, P) of the last encoder


@dataclass(frozen=True)
class ModelFamily:
    """What differs between SD and SDXL training."""

    name: str
    pipeline_class: str
    text_encoders: tuple[str, ...]  # component names in model_index.json
    tokenizers: tuple[str, ...]
    encode: Callable  # (text_encoders, tokenizers, prompts, device) -> (embeds (B, L, D), pooled (B, P) | None)
    micro_conditioning: bool  # SDXL `time_ids` + pooled text embeds as `added_cond_kwargs`
    vae_fp32: bool  # keep the stock VAE in fp32 under mixed precision


FAMILIES = {
    "StableDiffusionPipeline": ModelFamily("sd", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",),
                                           _encode_sd, micro_conditioning=False, vae_fp32=False),
    "StableDiffusionXLPipeline": ModelFamily("sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
                                             ("tokenizer", "tokenizer_2"), _encode_sdxl,
                                             micro_conditioning=True, vae_fp32=True),
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
                         f"{' and '.join(FAMILIES)} (SD 1.x/2.x and SDXL).")
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
    unet: nn.Module
    noise_scheduler: object

    def encode_prompts(self, prompts: Sequence[str], text_encoders: Sequence[nn.Module] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 77, D) text embeddings and the pooled (B, P) embeddings (SDXL) or None (SD).

        ``text_encoders`` replaces the loaded ones, e.g. by their data-parallel wrappers in training.
        """
        encoders = list(text_encoders or self.text_encoders)
        device = next(self.text_encoders[0].parameters()).device
        return self.family.encode(encoders, self.tokenizers, prompts, device)


def load_components(path: str, *, revision: str | None, variant: str | None, cache_dir: str | None,
                    vae_path: str | None, prediction_type: str | None, weight_dtype: torch.dtype) -> Components:
    """Load tokenizers, text encoders, VAE, UNet and the training noise scheduler of the pipeline.

    Frozen weights are loaded in ``weight_dtype``; the VAE stays fp32 for SDXL unless ``vae_path``
    (e.g. an fp16-fixed VAE) is given.
    """
    from diffusers import AutoencoderKL, DDPMScheduler

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
    unet = load("unet", weight_dtype)
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelError(f"`--pretrained_model_name_or_path` `{path}`: the UNet takes {unet.config.in_channels} "
                         f"input channels, not the VAE's {vae.config.latent_channels} (an inpainting model?); "
                         "use a text-to-image base model.")
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    except OSError as err:
        raise ModelError(f"`--pretrained_model_name_or_path` `{path}`: cannot load `scheduler` ({err}).") from err
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    for model in (*text_encoders, vae, unet):
        model.requires_grad_(False).eval()
    return Components(family, path, index, tokenizers, text_encoders, vae, unet, noise_scheduler)


# ---------------------------------------------------------------------------------------------
# Conditioning, noise, target and loss


def time_ids(original_sizes: Sequence[Sequence[int]], crops_top_left: Sequence[Sequence[int]],
             target_size: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL micro-conditioning, one row per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    rows = [[*map(int, orig), *map(int, crop), *map(int, target_size)]
            for orig, crop in zip(original_sizes, crops_top_left, strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)  # (B, 6)


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise like ``latents`` from ``generator`` (CPU, so any device gets the same draw),
    plus the per-channel offset of "noise offset" training."""
    shape = latents.shape  # (B, C, h, w)
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise.to(device=latents.device, dtype=latents.dtype)


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(f"Unsupported prediction type {prediction_type!r}: use `--prediction_type epsilon` "
                     "or `v_prediction`.")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   snr_gamma: float | None) -> torch.Tensor:
    """Per-sample MSE, shape (B,), in fp32; with ``snr_gamma`` the min-SNR weighting (Hang et al. 2023)."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma is None:
        return loss
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)  # (B,)
    weight = snr.clamp(max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        weight = weight / (snr + 1)  # the paper's v weight; diffusers' DreamBooth scripts use min(snr, γ)/snr + 1
    else:
        weight = weight / snr
    return loss * weight


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, is_class: torch.Tensor,
                    noise_scheduler, snr_gamma: float | None, prior_loss_weight: float) -> torch.Tensor:
    """The loss of a batch (B,) of instance and class samples, as diffusers' DreamBooth scripts: the
    instance loss (min-SNR weighted with ``snr_gamma``) plus ``prior_loss_weight`` times the plain
    MSE of the class samples (min-SNR weights the instance loss only)."""
    instance = ~is_class
    loss = pred.new_zeros((), dtype=torch.float32)
    if instance.any():
        loss = diffusion_loss(pred[instance], target[instance], timesteps[instance], noise_scheduler, snr_gamma).mean()
    if is_class.any():
        prior = diffusion_loss(pred[is_class], target[is_class], timesteps[is_class], noise_scheduler, None).mean()
        loss = loss + prior_loss_weight * prior
    return loss
