"""Typed settings of the DreamBooth trainer: one dataclass per concern, one flag per field.

Each field is a command-line flag of the same name (diffusers' names where they exist), with its
default and help text next to it, so the parser, the YAML loader and the resolved-config writer
all read the same table. Precedence: field defaults < ``--config FILE.yaml`` < command line.
YAML keys are flag names (flat, no sections); unknown keys and wrong types are rejected, and every
problem of a config is reported in one error.

    config = load_config(["--config", "configs/demo.yaml", "--max_train_steps", "10"])
    config.optim.learning_rate, config.flat.rho, config.to_flags()
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import math
import random
import types
import typing
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

import yaml

from flatlora_diffusion.dreambooth.data import RESAMPLE
from flatlora_diffusion.dreambooth.objectives import WEIGHTING_SCHEMES
from flatlora_diffusion.files import write_text
from flatlora_diffusion.flat_lora import SAMPLER_CHOICES, SCHEDULES, FlatLoraConfig
from flatlora_diffusion.typed_config import help_field as _f
from flatlora_diffusion.typed_config import type_errors
from flatlora_diffusion.typed_config import type_ok as _type_ok

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "prodigy")
# Highest ρ accepted: the paper sweeps 0.01-0.20; beyond 0.5 the noise is half the weight norm.
MAX_RHO = 0.5
# Defaults that depend on the model family (the flag's default is None until the family is known):
# the values of diffusers' `train_dreambooth_lora.py` (SD), `_sdxl.py`, `_sd3.py` and `_flux.py`,
# and each pipeline's own guidance for validation (7.5 kept for SDXL, as before). `lora_target_modules`
# comes from the family (`dreambooth.models.ModelFamily.lora_targets`); FLUX's `guidance_scale` only
# when its transformer has a guidance embedding.
FAMILY_DEFAULTS = {
    "sd": {"resolution": 512, "adam_weight_decay": 1e-2, "validation_guidance_scale": 7.5},
    "sdxl": {"resolution": 1024, "adam_weight_decay": 1e-4, "validation_guidance_scale": 7.5},
    "sd3": {"resolution": 512, "adam_weight_decay": 1e-4, "validation_guidance_scale": 7.0,
            "weighting_scheme": "logit_normal", "precondition_outputs": True, "max_sequence_length": 77},
    "flux": {"resolution": 512, "adam_weight_decay": 1e-4, "validation_guidance_scale": 3.5,
             "weighting_scheme": "none", "precondition_outputs": False, "max_sequence_length": 512},
}
FLUX_GUIDANCE_SCALE = 3.5  # diffusers' `train_dreambooth_lora_flux.py --guidance_scale` default
FLOW_MATCHING_FLAGS = ("weighting_scheme", "precondition_outputs", "max_sequence_length", "guidance_scale",
                       "lora_blocks")
# Flags of diffusers' SD/SDXL DreamBooth LoRA scripts that this trainer refuses, and why.
REFUSED = {
    "tokenizer_name": "the tokenizer is the pipeline's own (`tokenizer/`), the one its text encoder was trained "
                      "with and its pipelines use at inference.",
    "tokenizer_max_length": "prompts are tokenised to the tokenizer's `model_max_length` (77 for CLIP), the length "
                            "SD/SDXL pipelines use at inference; diffusers has the flag for DeepFloyd IF's T5 encoder.",
    "text_encoder_use_attention_mask": "SD/SDXL's CLIP text encoders run without an attention mask in training and "
                                       "in diffusers' pipelines; diffusers has the flag for DeepFloyd IF's T5 encoder.",
    "class_labels_conditioning": "SD/SDXL UNets have no class embedding; the flag serves UNets that have one "
                                 "(DeepFloyd IF stage II, the x4 upscaler), which this trainer does not train.",
    "validation_images": "validation samples text-to-image; input images serve image-variation and upscaler "
                         "pipelines, which this trainer does not train.",
    "do_edm_style_training": "this trainer trains DDPM-style epsilon / v-prediction models; EDM-parametrised "
                             "models (e.g. Playground v2.5) are not supported.",
    "crops_coords_top_left_h": "SDXL's crop coordinates come from each image's real crop.",
    "crops_coords_top_left_w": "SDXL's crop coordinates come from each image's real crop.",
}
SECRET_FLAGS = frozenset({"hub_token"})  # never written to `config.yaml`, checkpoints or trackers


class ConfigError(ValueError):
    """One or more invalid settings; the message lists every problem, one per line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("Invalid training configuration:\n  - " + "\n  - ".join(self.errors)
                         + "\n(Files -- images, model, checkpoint -- are checked once the settings are valid.)")


# ---------------------------------------------------------------------------------------------
# Type checks from the annotations (str, int, float, bool, `X | None`, `list[str]`)


def _strip_none(hint):
    args = [h for h in typing.get_args(hint) if h is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_name(hint) -> str:
    base = _strip_none(hint)
    name = "a list of strings" if typing.get_origin(base) is list else _TYPE_NAMES.get(base, str(base))
    return name + (" or null" if base is not hint else "")


def _coerce_yaml(value, hint):
    """PyYAML reads `1e-4` (no dot) as a string: accept numeric strings for float fields."""
    if isinstance(value, str) and _strip_none(hint) is float:
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class _Section:
    """Base of the sections: type checks from the annotations, then the section's `_check`."""

    def __post_init__(self) -> None:
        errors = type_errors(self, lambda name: f"--{name}", _type_name)
        if not errors:  # value checks assume the types are right
            errors = self._check()
        if errors:
            raise ConfigError(errors)

    def _check(self) -> list[str]:
        return []


def _at_least(obj, name: str, low: float, exclusive: bool = False) -> list[str]:
    value = getattr(obj, name)
    if value is None:
        return []
    if not math.isfinite(value) or (value <= low if exclusive else value < low):
        return [f"`--{name}` must be {'>' if exclusive else '>='} {low:g}, got {value!r}."]
    return []


# ---------------------------------------------------------------------------------------------
# The sections


@dataclass
class ModelConfig(_Section):
    """The base pipeline (SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1, detected from its `model_index.json`)."""

    pretrained_model_name_or_path: str | None = _f(
        None, "Base pipeline: hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`, "
        "`stabilityai/stable-diffusion-3.5-medium`, `black-forest-labs/FLUX.1-dev`), local diffusers folder, or "
        "`tiny:sd` / `tiny:sd-v` / `tiny:sdxl` / `tiny:sd3` / `tiny:flux` for a tiny random model built on first "
        "use (demos, tests)."
    )
    pretrained_vae_model_name_or_path: str | None = _f(
        None, "A VAE to use instead of the pipeline's, e.g. `madebyollin/sdxl-vae-fp16-fix` (then the SDXL VAE "
              "may run in half precision)."
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base pipeline.")
    variant: str | None = _f(None, "Weight variant of the base pipeline files, e.g. `fp16`.")
    cache_dir: str | None = _f(None, "Where downloaded models are stored (default: the Hugging Face cache).")
    prediction_type: str | None = _f(
        None, "Override the scheduler's prediction type (`epsilon` or `v_prediction`); default: the model's. "
              "SD/SDXL only (SD3 and FLUX are flow-matching models).",
        choices=("epsilon", "v_prediction"),
    )
    max_sequence_length: int | None = _f(
        None, "T5 tokens per prompt (SD3/FLUX only). Default: 77 for SD3, 512 for FLUX, as diffusers' scripts."
    )
    guidance_scale: float | None = _f(
        None, f"Value fed to FLUX.1-dev's guidance embedding in training (FLUX with a guidance embedding only). "
              f"Default: {FLUX_GUIDANCE_SCALE:g}, as diffusers."
    )

    def _check(self) -> list[str]:
        errors = []
        if not self.pretrained_model_name_or_path or not self.pretrained_model_name_or_path.strip():
            errors.append("`--pretrained_model_name_or_path` is required: a hub id, a local diffusers folder or "
                          "`tiny:sd` (the offline demo: `--config configs/demo.yaml`).")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            errors.append(f"`--prediction_type` must be `epsilon` or `v_prediction`, got {self.prediction_type!r}.")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            errors.append(f"`--max_sequence_length` must be in [1, 512] (T5's length), got {self.max_sequence_length}.")
        errors += _at_least(self, "guidance_scale", 0)
        return errors


@dataclass
class LoraSettings(_Section):
    """The LoRA adapters on the denoiser (UNet or transformer) and optionally the CLIP text encoders."""

    rank: int = _f(4, "LoRA rank r (the paper's SDXL run: 4).")
    lora_alpha: float | None = _f(None, "LoRA alpha; the update is scaled by alpha/r. Default: equal to `--rank`.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch input.")
    use_dora: bool = _f(False, "Train DoRA (weight-decomposed LoRA) adapters instead of plain LoRA.")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")
    lora_target_modules: list[str] | None = _f(
        None, "Denoiser modules that get LoRA (comma-separated on the command line). Default: the attention "
              "projections, `to_q,to_k,to_v,to_out.0`; for SD3/FLUX also the joint attention's text-stream "
              "projections `add_q_proj,add_k_proj,add_v_proj,to_add_out`.",
    )
    lora_layers: list[str] | None = _f(
        None, "The name diffusers' SD3/FLUX scripts give `--lora_target_modules` (e.g. `attn.to_k,attn.to_q`); "
              "give one of the two."
    )
    lora_blocks: list[str] | None = _f(
        None, "SD3/FLUX: only these `transformer_blocks` (indices, comma-separated, e.g. `12,13`) get LoRA, as "
              "diffusers' SD3 script; default all blocks (FLUX: also the single-stream blocks)."
    )
    train_text_encoder: bool = _f(
        False, "Also train LoRA on the CLIP text encoder(s) (Flat-LoRA applies there too; T5 stays frozen); "
               "prompts are then encoded every step instead of once."
    )
    text_encoder_target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "out_proj"], "Text-encoder modules that get LoRA with `--train_text_encoder`."
    )
    text_encoder_lr: float | None = _f(None, "Learning rate of the text-encoder LoRA; default `--learning_rate`.")
    pre_compute_text_embeddings: bool = _f(
        False, "Accepted for diffusers' scripts: prompt embeddings are always computed once when the text encoders "
               "are frozen (they stay loaded for validation); not with `--train_text_encoder`."
    )

    def _check(self) -> list[str]:
        errors = []
        if self.rank < 1:
            errors.append(f"`--rank` must be an integer >= 1, got {self.rank}.")
        errors += _at_least(self, "lora_alpha", 0, exclusive=True)
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"`--lora_dropout` must be in [0, 1), got {self.lora_dropout}.")
        for name in ("lora_target_modules", "lora_layers", "text_encoder_target_modules"):
            value = getattr(self, name)
            if value is not None and not [m for m in value if m.strip()]:
                errors.append(f"`--{name}` must name at least one module, e.g. `to_q,to_k,to_v,to_out.0`.")
        if self.lora_target_modules is not None and self.lora_layers is not None:
            errors.append("Give `--lora_target_modules` or `--lora_layers` (the same setting), not both.")
        bad_blocks = [b for b in self.lora_blocks or [] if not b.strip().isdigit()]
        if bad_blocks or (self.lora_blocks is not None and not self.lora_blocks):
            errors.append(f"`--lora_blocks` must be block indices such as `12,13`, got {self.lora_blocks!r}.")
        errors += _at_least(self, "text_encoder_lr", 0, exclusive=True)
        if self.pre_compute_text_embeddings and self.train_text_encoder:
            errors.append("`--pre_compute_text_embeddings` cannot be combined with `--train_text_encoder`: a trained "
                          "encoder's embeddings change every step. Drop one of them.")
        return errors

    @property
    def alpha(self) -> float:
        """The effective alpha (``--lora_alpha``, or the rank when unset)."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)


@dataclass
class DataConfig(_Section):
    """Instance (subject) images, prior-preservation class images and their preprocessing."""

    instance_data_dir: str | None = _f(
        None, "Folder of the subject's images (a `name.txt` beside `name.jpg` is that image's caption)."
    )
    instance_prompt: str | None = _f(None, "Prompt of the subject images, with its rare identifier: `a photo of sks dog`.")
    dataset_name: str | None = _f(
        None, "Instead of `--instance_data_dir`: a Hugging Face dataset (hub id or local `imagefolder`)."
    )
    dataset_config_name: str | None = _f(None, "Config of `--dataset_name`.")
    image_column: str = _f("image", "Image column of `--dataset_name`.")
    caption_column: str | None = _f(None, "Caption column of `--dataset_name` (default: `--instance_prompt` for all).")
    class_data_dir: str | None = _f(None, "Folder of class images for prior preservation (missing ones are generated).")
    class_prompt: str | None = _f(None, "Prompt of the class images: `a photo of dog`.")
    with_prior_preservation: bool = _f(False, "Add the prior-preservation loss on class images.")
    num_class_images: int = _f(100, "Class images wanted; the missing ones are generated with the base model "
                                    "before training (resumable: existing images are kept).")
    prior_loss_weight: float = _f(1.0, "Weight of the prior-preservation loss.")
    sample_batch_size: int = _f(4, "Batch size of the class-image generation.")
    class_num_inference_steps: int = _f(30, "Denoising steps per generated class image.")
    prior_generation_precision: str | None = _f(
        None, "Precision of the class-image generation: `fp32` (or `no`), `fp16` (CUDA) or `bf16`; then a separate "
              "copy of the base pipeline generates them. Default: the training models in `--mixed_precision`'s dtype.",
        choices=("no", "fp32", "fp16", "bf16"),
    )
    resolution: int | None = _f(None, "Training resolution in pixels (multiple of 8); images are resized to cover "
                                      "it, then cropped. Default: 512 for SD 1.x/2.x, 1024 for SDXL.")
    center_crop: bool = _f(False, "Center crop instead of a random crop.")
    random_flip: bool = _f(False, "Flip images horizontally at random (drawn afresh every epoch).")
    enable_bucketing: bool = _f(
        False, "Aspect-ratio buckets of about `--resolution`² pixels instead of square crops."
    )
    bucket_step: int | None = _f(None, "Bucket side granularity in pixels (multiple of 8); default min(64, resolution/4).")
    max_aspect: float = _f(2.0, "Largest bucket aspect ratio (long side / short side).")
    image_interpolation_mode: str = _f("lanczos", "Resize filter (diffusers' choices, as Pillow filters).",
                                       choices=tuple(RESAMPLE), casefold=True)
    skip_bad_images: bool = _f(False, "Skip unreadable or truncated images with a warning instead of stopping.")
    repeats: int = _f(1, "How many times each instance image appears per epoch.")
    dataloader_num_workers: int = _f(0, "Data-loading worker processes (0: load in the main process).")
    cache_latents: bool = _f(
        False, "Keep each image's VAE encoding after its first use instead of re-encoding it every epoch "
               "(a crop/flip seen before reuses it; each image is encoded alone, so a resume is exact)."
    )

    def _check(self) -> list[str]:
        errors = []
        if self.dataset_name and self.instance_data_dir:
            errors.append("Give either `--instance_data_dir` or `--dataset_name`, not both.")
        elif not (self.instance_data_dir or "").strip() and not self.dataset_name:
            errors.append("`--instance_data_dir` is required: the folder of the subject's images "
                          "(or `--dataset_name` for a Hugging Face dataset).")
        if not self.instance_prompt or not self.instance_prompt.strip():
            errors.append("`--instance_prompt` is required, e.g. `a photo of sks dog`.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            low = max(8, self.resolution // 8 * 8)
            errors.append(f"`--resolution` must be a positive multiple of 8 (the VAE downsamples 8x), got "
                          f"{self.resolution}; try {low} or {low + 8}.")
        if self.with_prior_preservation:
            if not self.class_data_dir:
                errors.append("`--with_prior_preservation` needs `--class_data_dir` (created if missing).")
            if not self.class_prompt:
                errors.append("`--with_prior_preservation` needs `--class_prompt`, e.g. `a photo of dog`.")
        for name in ("num_class_images", "repeats", "dataloader_num_workers"):
            errors += _at_least(self, name, 0 if name != "repeats" else 1)
        for name in ("sample_batch_size", "class_num_inference_steps"):
            errors += _at_least(self, name, 1)
        errors += _at_least(self, "prior_loss_weight", 0)
        if self.bucket_step is not None and (self.bucket_step < 8 or self.bucket_step % 8
                                             or self.bucket_step > (self.resolution or 1024) // 2):
            errors.append(f"`--bucket_step` must be a multiple of 8 between 8 and `--resolution`/2, "
                          f"got {self.bucket_step}.")
        if not self.max_aspect >= 1:
            errors.append(f"`--max_aspect` must be >= 1, got {self.max_aspect}.")
        if self.image_interpolation_mode not in RESAMPLE:
            errors.append(f"`--image_interpolation_mode` must be one of {', '.join(RESAMPLE)}, "
                          f"got {self.image_interpolation_mode!r}.")
        if self.prior_generation_precision not in (None, "no", "fp32", "fp16", "bf16"):
            errors.append("`--prior_generation_precision` must be one of no, fp32, fp16, bf16, "
                          f"got {self.prior_generation_precision!r}.")
        return errors


@dataclass
class OptimConfig(_Section):
    """Steps, batch, optimiser, learning-rate schedule and the diffusion loss."""

    train_batch_size: int = _f(4, "Batch size per device (instance images; prior preservation doubles it).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimiser step.")
    max_train_steps: int | None = _f(None, "Optimiser steps; overrides `--num_train_epochs` when set.")
    num_train_epochs: int = _f(1, "Epochs, when `--max_train_steps` is not set.")
    learning_rate: float = _f(1e-4, "Learning rate of the UNet LoRA (after warmup).")
    scale_lr: bool = _f(False, "Multiply the learning rate by accumulation steps x batch size x processes.")
    lr_scheduler: str = _f("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "Warmup optimiser steps of the schedule.")
    lr_num_cycles: int = _f(1, "Hard restarts of `cosine_with_restarts`.")
    lr_power: float = _f(1.0, "Power of the `polynomial` schedule.")
    optimizer: str = _f("adamw", "`adamw` or `prodigy` (needs `pip install prodigyopt`); any case, as diffusers' `AdamW`.",
                        choices=OPTIMIZERS, casefold=True)
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes (needs `pip install bitsandbytes` and CUDA).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    adam_weight_decay: float | None = _f(None, "Weight decay of the denoiser's LoRA parameters. Default: 1e-2 for "
                                                "SD 1.x/2.x, 1e-4 for SDXL, SD3 and FLUX.")
    adam_weight_decay_text_encoder: float = _f(1e-3, "Weight decay of the text-encoder LoRA parameters.")
    prodigy_beta3: float | None = _f(None, "Prodigy beta3 (default: sqrt(beta2)).")
    prodigy_decouple: bool = _f(True, "Prodigy: AdamW-style decoupled weight decay.")
    prodigy_use_bias_correction: bool = _f(True, "Prodigy: Adam bias correction.")
    prodigy_safeguard_warmup: bool = _f(True, "Prodigy: no d-estimate increase during warmup.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping).")
    seed: int | None = _f(None, "Seed of everything (data order, noise, timesteps, Flat-LoRA); default: a random "
                                "seed, recorded in the resolved config.")
    snr_gamma: float | None = _f(None, "Min-SNR loss weighting gamma (5.0 is the recommended value); off by default. "
                                       "SD/SDXL only (flow-matching models weight with `--weighting_scheme`).")
    weighting_scheme: str | None = _f(
        None, "SD3/FLUX flow matching: density of the training timesteps and loss weighting, as diffusers' "
              "`training_utils`. Default: `logit_normal` for SD3, `none` (uniform) for FLUX, as diffusers' scripts.",
        choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = _f(0.0, "Mean of the `logit_normal` timestep density.")
    logit_std: float = _f(1.0, "Standard deviation of the `logit_normal` timestep density.")
    mode_scale: float = _f(1.29, "Scale of the `mode` timestep density.")
    precondition_outputs: bool | None = _f(
        None, "SD3 only: turn the predicted velocity into an x_0 estimate and regress x_0 (diffusers' SD3 "
              "default, on); FLUX regresses the velocity."
    )
    noise_offset: float = _f(0.0, "Noise offset (per-channel constant added to the noise); 0.05-0.1 helps dark/bright images.")

    def _check(self) -> list[str]:
        errors = []
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                     "lr_num_cycles"):
            errors += _at_least(self, name, 1)
        for name in ("lr_warmup_steps", "adam_weight_decay", "adam_weight_decay_text_encoder", "max_grad_norm",
                     "noise_offset", "adam_epsilon"):
            errors += _at_least(self, name, 0)
        errors += _at_least(self, "learning_rate", 0, exclusive=True)
        errors += _at_least(self, "snr_gamma", 0, exclusive=True)
        errors += _at_least(self, "logit_std", 0, exclusive=True)
        if self.weighting_scheme not in (None, *WEIGHTING_SCHEMES):
            errors.append(f"`--weighting_scheme` must be one of {', '.join(WEIGHTING_SCHEMES)}, "
                          f"got {self.weighting_scheme!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"`--{name}` must be in [0, 1), got {getattr(self, name)}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            errors.append(f"`--lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}.")
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"`--optimizer` must be `adamw` or `prodigy`, got {self.optimizer!r}.")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            errors.append(f"`--seed` must be in [0, 2**32), got {self.seed}.")
        return errors


@dataclass
class MemoryConfig(_Section):
    """Precision, attention kernels and activation checkpointing."""

    mixed_precision: str | None = _f(
        None, "`no`, `fp16` or `bf16`: frozen weights in that dtype, LoRA parameters in fp32. Default: the "
              "`accelerate launch` setting (or `no`).", choices=PRECISIONS,
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (slower).")
    enable_xformers_memory_efficient_attention: bool = _f(
        False, "Use xformers attention (needs `pip install xformers` and CUDA); default is PyTorch SDPA."
    )
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less precise).")

    def _check(self) -> list[str]:
        if self.mixed_precision not in (None, *PRECISIONS):
            return [f"`--mixed_precision` must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}."]
        return []


@dataclass
class CheckpointConfig(_Section):
    """Where outputs go, periodic checkpoints and resuming."""

    output_dir: str = _f("flatlora-dreambooth-model", "Output folder: adapter, checkpoints, validation images, logs.")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimiser steps, and at the last step.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints (oldest deleted first).")
    resume_from_checkpoint: str | None = _f(
        None, "Resume from a checkpoint folder, or `latest` (the newest complete one in `--output_dir`; starts "
              "fresh if there is none; a finished run is left as it is)."
    )
    output_kohya_format: bool = _f(False, "Also write the adapter in kohya format (`pytorch_lora_weights_kohya.safetensors`).")
    push_to_hub: bool = _f(False, "Upload the output folder (adapter, model card, images; no checkpoints) to the "
                                  "Hugging Face Hub at the end; access is checked before training.")
    hub_model_id: str | None = _f(None, "Hub repository of `--push_to_hub` (`name` or `user/name`); default: the "
                                        "name of `--output_dir`.")
    hub_token: str | None = _f(None, "Hub token of `--push_to_hub` (default: `hf auth login`'s or `HF_TOKEN`); "
                                     "never written to disk.")

    def _check(self) -> list[str]:
        errors = _at_least(self, "checkpointing_steps", 1) + _at_least(self, "checkpoints_total_limit", 1)
        if not self.output_dir.strip():
            errors.append("`--output_dir` must not be empty.")
        for name in ("hub_model_id", "hub_token"):
            if getattr(self, name) is not None and not self.push_to_hub:
                errors.append(f"`--{name}` is used only with `--push_to_hub`: add `--push_to_hub`, or drop `--{name}`.")
        return errors


@dataclass
class ValidationConfig(_Section):
    """Sample images during and after training."""

    validation_prompt: str | None = _f(None, "Prompt of the validation images (none: no validation).")
    validation_extra_prompts: list[str] = _f(
        [], "More validation prompts, each sampled like `--validation_prompt` (YAML list; comma-separated on the "
        "command line); their images are `prompt01_000.png`, ...")
    num_validation_images: int = _f(4, "Images per validation.")
    validation_steps: int | None = _f(None, "Validate every N optimiser steps.")
    validation_epochs: int | None = _f(None, "Validate every N epochs.")
    validation_num_inference_steps: int = _f(25, "Denoising steps of the validation images.")
    validation_guidance_scale: float | None = _f(
        None, "Guidance scale of the validation images (FLUX: its guidance embedding). Default: the pipeline's "
              "(SD3 7.0, FLUX 3.5), 7.5 for SD and SDXL.")
    validation_negative_prompt: str | None = _f(None, "Negative prompt of the validation images.")
    final_validation: bool = _f(
        True, "After training, reload the saved adapter from disk into a fresh pipeline and sample the prompt."
    )

    def _check(self) -> list[str]:
        errors = []
        for name in ("num_validation_images", "validation_steps", "validation_epochs", "validation_num_inference_steps"):
            errors += _at_least(self, name, 1)
        errors += _at_least(self, "validation_guidance_scale", 0)
        if self.validation_extra_prompts and not self.validation_prompt:
            errors.append("`--validation_extra_prompts` needs `--validation_prompt` (the first prompt).")
        return errors

    @property
    def prompts(self) -> list[str]:
        """Every validation prompt, `validation_prompt` first."""
        return [self.validation_prompt, *self.validation_extra_prompts] if self.validation_prompt else []


@dataclass
class LoggingConfig(_Section):
    """Experiment trackers."""

    report_to: str = _f("tensorboard", "Tracker: `tensorboard`, `wandb` (needs `pip install wandb`), `all` or `none`.",
                        choices=REPORT_TO)
    logging_dir: str = _f("logs", "TensorBoard folder, relative to `--output_dir`.")
    tracker_project_name: str = _f("dreambooth-flat-lora", "Project (run group) name in the tracker.")

    def _check(self) -> list[str]:
        if self.report_to not in REPORT_TO:
            return [f"`--report_to` must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}."]
        return []


# The Flat-LoRA section is the core's `FlatLoraConfig`; its fields get these flag names.
FLAT_FLAGS = {
    "rho": "rho",
    "schedule": "flat_schedule",
    "interval": "flat_interval",
    "sampler": "flat_sampler",
    "seed": "flat_seed",
    "noise_per_rank": "flat_noise_per_rank",
    "total_steps": "flat_total_steps",
    "pool_size": "flat_pool_size",
}
# Trainer defaults that differ from the core's: ρ = 0.1 is the paper's value for SDXL DreamBooth; the
# noise seed follows `--seed` unless set (resolved by the trainer, so a new `--seed` is new noise).
FLAT_DEFAULTS = {"rho": 0.1, "seed": None}
FLAT_HINTS = {"seed": int | None}
FLAT_CHOICES = {"schedule": tuple(SCHEDULES), "sampler": SAMPLER_CHOICES}
FLAT_HELP_EXTRA = {"total_steps": " Default: `--max_train_steps`.", "seed": " Default: `--seed`."}

SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "optim": OptimConfig,
    "memory": MemoryConfig,
    "checkpoint": CheckpointConfig,
    "validation": ValidationConfig,
    "logging": LoggingConfig,
}


@dataclass(frozen=True)
class Flag:
    """One command-line flag / YAML key: which section field it sets, its type, default and help."""

    name: str
    section: str
    attr: str
    hint: object
    default: object
    help: str
    choices: tuple | None = None
    casefold: bool = False  # `AdamW` means `adamw`

    def normalise(self, value):
        """The value as stored: lower-cased for case-insensitive flags."""
        return value.lower() if self.casefold and isinstance(value, str) else value


def _flag_table() -> dict[str, Flag]:
    table: dict[str, Flag] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            table[f.name] = Flag(f.name, section, f.name, hints[f.name], default, f.metadata["help"],
                                 f.metadata.get("choices"), f.metadata.get("casefold", False))
    hints = typing.get_type_hints(FlatLoraConfig)
    for f in fields(FlatLoraConfig):
        name = FLAT_FLAGS[f.name]
        default = FLAT_DEFAULTS.get(f.name, f.default)
        table[name] = Flag(name, "flat", f.name, FLAT_HINTS.get(f.name, hints[f.name]), default,
                           f.metadata["help"] + FLAT_HELP_EXTRA.get(f.name, ""), FLAT_CHOICES.get(f.name))
    return table


FLAGS = _flag_table()


# ---------------------------------------------------------------------------------------------
# The whole configuration


@dataclass
class TrainConfig:
    """Every setting of a DreamBooth run, by concern."""

    model: ModelConfig
    lora: LoraSettings
    flat: FlatLoraConfig
    data: DataConfig
    optim: OptimConfig
    memory: MemoryConfig
    checkpoint: CheckpointConfig
    validation: ValidationConfig
    logging: LoggingConfig

    @classmethod
    def from_flags(cls, values: dict) -> TrainConfig:
        """Build from ``{flag name: value}`` (unset flags take their defaults); raise one `ConfigError`."""
        errors = [_unknown_key_error(key, "") for key in values if key not in FLAGS]
        per_section: dict[str, dict] = {name: {} for name in [*SECTIONS, "flat"]}
        for flag in FLAGS.values():
            if flag.name in values:
                per_section[flag.section][flag.attr] = flag.normalise(values[flag.name])
        built = {}
        for name, kwargs in per_section.items():
            try:
                built[name] = _build_flat(kwargs) if name == "flat" else SECTIONS[name](**kwargs)
            except ConfigError as err:
                errors += err.errors
        errors += _cross_errors(built)
        if errors:
            raise ConfigError(errors)
        return cls(**built)

    def to_flags(self, secrets: bool = False) -> dict:
        """``{flag name: value}`` of every flag: loads back with `TrainConfig.from_flags`. Secrets
        (`--hub_token`) are None unless ``secrets``: this is what files and trackers get."""
        out = {}
        for flag in FLAGS.values():
            value = getattr(getattr(self, flag.section), flag.attr)
            if flag.name in SECRET_FLAGS and not secrets:
                value = None
            out[flag.name] = list(value) if isinstance(value, list) else value
        return out

    def resolved(self, **updates) -> TrainConfig:
        """A copy with values the trainer decided (``flag=value``): a random seed, the step count..."""
        values = self.to_flags(secrets=True) | updates
        return TrainConfig.from_flags(values)

    def with_family_defaults(self, family: str, **more) -> TrainConfig:
        """Fill the flags left unset whose default depends on the model family (`sd`, `sdxl`, `sd3`,
        `flux`): `FAMILY_DEFAULTS`, then ``more`` (defaults read from the model)."""
        values = self.to_flags(secrets=True)
        defaults = FAMILY_DEFAULTS[family] | more
        return self.resolved(**{name: value for name, value in defaults.items() if values[name] is None})

    def family_errors(self, family: str, *, guidance_embeds: bool = False, num_blocks: int | None = None,
                      model: str = "") -> list[str]:
        """Settings that do not apply to the base model's family (checked before anything loads):
        flow-matching flags on SD/SDXL, DDPM flags on SD3/FLUX, FLUX's guidance and precision rules."""
        values, errors = self.to_flags(secrets=True), []
        flow = family in ("sd3", "flux")
        if not flow:
            errors += [f"`--{name}` applies to SD3 and FLUX (flow-matching) models only; `{model}` is "
                       f"{family.upper()}: drop it." for name in FLOW_MATCHING_FLAGS if values[name] is not None]
            return errors
        if values["snr_gamma"] is not None:
            errors.append(f"`--snr_gamma` does not apply to `{model}` ({family.upper()}): min-SNR weighting is defined "
                          "for DDPM noise schedules; flow-matching models weight the loss with `--weighting_scheme`.")
        if values["prediction_type"] is not None:
            errors.append(f"`--prediction_type` does not apply to `{model}` ({family.upper()}): flow-matching models "
                          "always predict the velocity.")
        if family == "sd3" and values["output_kohya_format"]:
            errors.append("`--output_kohya_format`: diffusers has no kohya converter for SD3 LoRAs, so no such file "
                          "would load back. Drop the flag and use `pytorch_lora_weights.safetensors`.")
        if family == "flux" and values["precondition_outputs"]:
            errors.append("`--precondition_outputs` is SD3's (diffusers' SD3 script); FLUX regresses the velocity: "
                          "drop it.")
        if values["guidance_scale"] is not None and not guidance_embeds:
            errors.append(f"`--guidance_scale`: the transformer of `{model}` has no guidance embedding (SD3, "
                          "FLUX.1-schnell); the flag sets FLUX.1-dev's. Drop it (validation uses "
                          "`--validation_guidance_scale`).")
        if family == "flux" and values["mixed_precision"] == "fp16":
            errors.append("`--mixed_precision fp16` with FLUX: FLUX.1 is trained in bf16 and its activations overflow "
                          "fp16 (NaN loss, black images); use `--mixed_precision bf16`.")
        if values["resolution"] is not None and values["resolution"] % 16:
            errors.append(f"`--resolution` must be a multiple of 16 for {family.upper()} (8x VAE, then 2x2 latent "
                          f"patches), got {values['resolution']}.")
        if values["enable_bucketing"] and values["bucket_step"] is not None and values["bucket_step"] % 16:
            errors.append(f"`--bucket_step` must be a multiple of 16 for {family.upper()}, got {values['bucket_step']}.")
        blocks = [int(b) for b in values["lora_blocks"] or []]
        if num_blocks is not None and any(b >= num_blocks for b in blocks):
            errors.append(f"`--lora_blocks` {','.join(map(str, blocks))}: `{model}` has {num_blocks} transformer "
                          f"blocks (0-{num_blocks - 1}).")
        return errors

    def save_yaml(self, path: str | Path, header: str = "") -> Path:
        """Write every flag to ``path`` (atomically); ``--config`` of that file reproduces the run."""
        text = "".join(f"# {line}\n" for line in header.splitlines())
        text += yaml.safe_dump(self.to_flags(), sort_keys=False, allow_unicode=True)
        return write_text(path, text)


def _build_flat(kwargs: dict) -> FlatLoraConfig:
    """The core config, its errors renamed to the trainer's flags (`schedule` -> `--flat_schedule`)."""
    hints = typing.get_type_hints(FlatLoraConfig) | FLAT_HINTS
    errors = [f"`--{FLAT_FLAGS[name]}` must be {_type_name(hints[name])}, got {value!r}."
              for name, value in kwargs.items() if not _type_ok(value, hints[name])]
    if errors:
        raise ConfigError(errors)
    kwargs = {name: FLAT_DEFAULTS[name] for name in FLAT_DEFAULTS} | kwargs
    rho = kwargs["rho"]
    if not (math.isfinite(rho) and 0 <= rho <= MAX_RHO):  # the trainer's range; the core accepts [0, 1]
        too_large = f" (the noise norm would be {rho:.0%} of each weight row's norm)" if rho > MAX_RHO else ""
        errors.append(f"`--rho` must be a number in [0, {MAX_RHO}], got {rho!r}{too_large}. Use 0.05-0.2 (the paper: "
                      "0.1 for SDXL DreamBooth); 0 is plain LoRA.")
        kwargs["rho"] = 0.0  # still check the other fields
    try:
        config = FlatLoraConfig(**kwargs)
    except ValueError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        for core, flag in FLAT_FLAGS.items():
            lines = [line.replace(f"`{core}`", f"`--{flag}`") for line in lines]
        errors += lines or [str(err)]
    if errors:
        raise ConfigError(errors)
    return config


def _cross_errors(built: dict) -> list[str]:
    """Rules across flags and optional extras asked for but not installed. Each rule runs when the
    sections it reads are valid, so these are reported together with the per-section errors."""
    errors = []
    optim, memory, validation, log = (built.get(k) for k in ("optim", "memory", "validation", "logging"))
    if validation and validation.validation_steps is not None and validation.validation_epochs is not None:
        errors.append("Give either `--validation_steps` or `--validation_epochs`, not both.")
    if optim and optim.use_8bit_adam and optim.optimizer != "adamw":
        errors.append("`--use_8bit_adam` applies to `--optimizer adamw` only.")
    if optim and optim.optimizer == "prodigy" and not _installed("prodigyopt"):
        errors.append("`--optimizer prodigy` needs the `prodigyopt` package: `pip install prodigyopt` "
                      "(or `pip install flatlora-diffusion[prodigy]`).")
    if optim and optim.use_8bit_adam:
        if not _installed("bitsandbytes"):
            errors.append("`--use_8bit_adam` needs the `bitsandbytes` package: `pip install bitsandbytes`.")
        elif not _cuda_available():
            errors.append("`--use_8bit_adam` needs a CUDA GPU; drop the flag on this machine.")
    if memory and memory.mixed_precision == "fp16" and not _cuda_available():
        errors.append("`--mixed_precision fp16` needs a CUDA GPU; use `bf16` or `no` on this machine.")
    data = built.get("data")
    if data and data.prior_generation_precision == "fp16" and not _cuda_available():
        errors.append("`--prior_generation_precision fp16` needs a CUDA GPU; use `fp32` or `bf16` on this machine.")
    if memory and memory.enable_xformers_memory_efficient_attention:
        if not _installed("xformers"):
            errors.append("`--enable_xformers_memory_efficient_attention` needs the `xformers` package "
                          "(`pip install xformers`); without the flag PyTorch SDPA attention is used.")
        elif not _cuda_available():
            errors.append("`--enable_xformers_memory_efficient_attention` needs a CUDA GPU; drop the flag "
                          "(PyTorch SDPA attention is used).")
    if log and log.report_to in ("wandb", "all") and not _installed("wandb"):
        errors.append(f"`--report_to {log.report_to}` needs the `wandb` package: `pip install wandb`, "
                      "or use `--report_to tensorboard`.")
    return errors


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _unknown_key_error(key: str, where: str, prefix: str = "") -> str:
    if key in REFUSED:
        return f"`{prefix}{key}`{where} (a flag of diffusers' scripts) is not supported: {REFUSED[key]}"
    close = difflib.get_close_matches(str(key), list(FLAGS), n=1)
    hint = f" Did you mean `{prefix}{close[0]}`?" if close else " See `--help` for the flags."
    what = "flag" if prefix else "setting"
    return f"Unknown {what} `{prefix}{key}`{where}.{hint}"


# ---------------------------------------------------------------------------------------------
# Command line and YAML


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _convert_cli(text: str, hint):
    """A command-line string as the flag's type; raises ValueError with the expected type."""
    base = _strip_none(hint)
    if base is not hint and text.strip().lower() in ("none", "null"):
        return None
    if typing.get_origin(base) is list:
        return _parse_list(text)
    return base(text)


_METAVARS = {int: "N", float: "X", str: "TEXT"}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class _BoolFlag(argparse.Action):
    """``--x`` / ``--no-x``, and diffusers' ``--x True`` / ``--x=false`` (their `type=bool` flags).
    A value that is not a boolean is kept as text, for `load_config` to report."""

    def __init__(self, option_strings, dest, **kwargs):
        negated = [f"--no-{s[2:]}" for s in option_strings]
        super().__init__([*option_strings, *negated], dest, nargs="?", metavar="true|false", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if value is None:
            setattr(namespace, self.dest, not option_string.startswith("--no-"))
        else:
            parsed = _BOOLS.get(value.strip().lower(), value)
            setattr(namespace, self.dest, (not parsed) if option_string.startswith("--no-") and parsed in (True, False)
                    else parsed)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser: one flag per config field; unset flags stay absent (YAML can set them).

    Values are kept as strings here and converted by `load_config`, so that every bad value is
    reported together instead of argparse stopping at the first.
    """
    parser = argparse.ArgumentParser(
        prog="train_dreambooth_flatlora.py",
        description="DreamBooth LoRA fine-tuning of Stable Diffusion / SDXL with Flat-LoRA. "
                    "Every flag can also be set in a `--config` YAML file (keys are flag names).",
        epilog="Refused flags of diffusers' DreamBooth LoRA scripts, each with its reason when given: "
               + ", ".join(f"--{name}" for name in REFUSED) + ".",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of flag values (keys are flag names); the command line overrides it.")
    parser.add_argument("--local_rank", "--local-rank", dest=LAUNCHER_RANK, metavar="N",
                        help="Set by `torch.distributed.launch`; ignored: the rank comes from `LOCAL_RANK`, as in "
                             "accelerate.")
    groups = {name: parser.add_argument_group(name, (cls.__doc__ or "").strip()) for name, cls in SECTIONS.items()}
    groups["flat"] = parser.add_argument_group("flat-lora", FlatLoraConfig.__doc__.strip().splitlines()[0])
    for flag in FLAGS.values():
        help_text = flag.help + ("" if flag.default in (None, []) else f" [default: {_show(flag.default)}]")
        kwargs: dict = {"help": help_text.replace("%", "%%"), "dest": flag.name}
        if _strip_none(flag.hint) is bool:  # `bool | None`: unset until the model family decides
            kwargs["action"] = _BoolFlag
        elif flag.choices:
            kwargs["metavar"] = "{" + ",".join(flag.choices) + "}"
        else:
            base = _strip_none(flag.hint)
            kwargs["metavar"] = "A,B,..." if typing.get_origin(base) is list else _METAVARS.get(base, "VALUE")
        groups[flag.section].add_argument(f"--{flag.name}", **kwargs)
    return parser


LAUNCHER_RANK = "_launcher_local_rank"  # `--local_rank`: accepted for launchers, not a setting


def _show(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def read_yaml(path: str | Path) -> tuple[dict, list[str]]:
    """Flag values from a YAML file, and the errors found (unknown keys, wrong types, unreadable file)."""
    path = Path(path)
    where = f" in `{path}`"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        return {}, [f"`--config` file `{path}` does not exist."]
    except (OSError, yaml.YAMLError) as err:
        return {}, [f"`--config` file `{path}` is not readable YAML: {err}"]
    if not isinstance(data, dict):
        return {}, [f"`--config` file `{path}` must be a mapping of flag names to values, got {type(data).__name__}."]
    values, errors = {}, []
    for key, value in data.items():
        if key not in FLAGS:
            errors.append(_unknown_key_error(key, where))
            continue
        flag = FLAGS[key]
        value = flag.normalise(_coerce_yaml(value, flag.hint))
        if typing.get_origin(_strip_none(flag.hint)) is list and isinstance(value, str):
            value = _parse_list(value)  # `to_q,to_k` is accepted as in the command line
        if not _type_ok(value, flag.hint):
            errors.append(f"`{key}`{where} must be {_type_name(flag.hint)}, got {value!r}.")
        elif flag.choices and value is not None and value not in flag.choices:
            errors.append(f"`{key}`{where} must be one of {', '.join(flag.choices)}, got {value!r}.")
        else:
            values[key] = value
    return values, errors


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line (and its ``--config`` YAML) into a validated `TrainConfig`."""
    namespace, unknown = build_parser().parse_known_args(argv)
    args = vars(namespace)
    args.pop(LAUNCHER_RANK, None)
    values, errors = {}, []
    after_flag = False  # the values of an unknown or refused flag are not reported again
    for arg in unknown:
        if arg.startswith("--"):
            errors.append(_unknown_key_error(arg[2:].split("=")[0], " on the command line", "--"))
            after_flag = True
        elif not after_flag:
            errors.append(f"Unexpected argument {arg!r}: every value needs its flag (`--name value`).")
    if "config" in args:
        values, yaml_errors = read_yaml(args.pop("config"))
        errors += yaml_errors
    for name, text in args.items():  # the command line wins
        flag = FLAGS[name]
        if _strip_none(flag.hint) is bool:  # `_BoolFlag` parsed it (text it kept is reported by the type check)
            values[name] = text
            continue
        try:
            values[name] = _convert_cli(text, flag.hint)
        except ValueError:
            errors.append(f"`--{name}` must be {_type_name(flag.hint)}, got {text!r}.")
            values.pop(name, None)
    try:
        config = TrainConfig.from_flags(values)
    except ConfigError as err:
        raise ConfigError(errors + err.errors) from None
    if errors:
        raise ConfigError(errors)
    return config


def with_seed(config: TrainConfig) -> TrainConfig:
    """The config with a concrete `--seed` (a random one when unset), so the resolved file reproduces the run."""
    if config.optim.seed is not None:
        return config
    return replace(config, optim=replace(config.optim, seed=random.SystemRandom().randrange(2**31)))
