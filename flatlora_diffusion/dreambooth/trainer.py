"""The DreamBooth LoRA trainer with Flat-LoRA: SD 1.x/2.x, SDXL, SD3/3.5 and FLUX.1 through one loop.

    trainer = DreamBoothTrainer(load_config(argv))
    trainer.setup()    # models, LoRA, Flat-LoRA, data, optimiser; resume; every input checked first
    trainer.train()    # the loop: checkpoints, validation, logging
    trainer.save()     # adapter + model card, then a validation that reloads it from disk

One step, for each micro-batch of an optimiser step:

    perturber.set_step(global_step)                        # Flat-LoRA: noise of this optimiser step
    latents = VAE(pixels) (or the cache)                   # (B, C, H/8, W/8), shifted and scaled
    noisy, t = objective.add_noise(latents, noise)         # DDPM or flow matching; keyed by the batch
    pred = family.predict(denoiser, noisy, t, text_embeds) # UNet / transformer: frozen weights + noise + LoRA
    loss = objective.loss(pred, ...)                       # [min-SNR | flow weighting] [+ prior loss]
    backward; on the last micro-batch: clip, optimiser step, lr step

The family (`dreambooth.models.FAMILIES`) supplies the prompt encoding and the denoiser call; the
objective (`dreambooth.objectives`) the noise and the loss.

Randomness is keyed, not streamed: the diffusion noise and timesteps of a micro-batch come from a
generator seeded with (seed, epoch, batch index, process), the data from (seed, epoch, index), and
Flat-LoRA's noise from (seed, optimiser step, layer, process). A resumed run therefore replays the
same numbers as an uninterrupted one; the global RNG (LoRA dropout) and the σ of the Flat-LoRA draw
in progress are saved in checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from flatlora_diffusion.dreambooth import checkpoints as ckpt
from flatlora_diffusion.dreambooth import data as db_data
from flatlora_diffusion.dreambooth import hub
from flatlora_diffusion.dreambooth.config import FLUX_GUIDANCE_SCALE, ConfigError, TrainConfig, with_seed
from flatlora_diffusion.dreambooth.models import (
    Components,
    DenoiserInput,
    ModelError,
    detect_family,
    load_components,
    read_denoiser_config,
    read_model_index,
    resolve_model_path,
)
from flatlora_diffusion.dreambooth.objectives import DDPMObjective, FlowMatchingObjective, sample_noise
from flatlora_diffusion.flat_lora import FlatLoraPerturber, mix_seed
from flatlora_diffusion.integrations.accelerate import prepare_flat_lora

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ADAPTER = "default"  # peft adapter name of the LoRA being trained


class DreamBoothError(ValueError):
    """Bad input found before training (files, model, checkpoint); lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("Cannot start training:\n  - " + "\n  - ".join(self.errors))


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss); nothing already written was touched."""


class DreamBoothTrainer:
    """Builds everything from a `TrainConfig`, trains, and writes the adapter."""

    def __init__(self, config: TrainConfig) -> None:
        self.seed_given = config.optim.seed is not None
        self.config = with_seed(config)  # a random seed is drawn now, and recorded in the resolved config
        self.seed = self.config.optim.seed
        self.output_dir = Path(self.config.checkpoint.output_dir)
        self.global_step = 0  # optimiser steps done
        self.epoch = 0
        self.batches_done = 0  # batches of `self.epoch` already trained on (this process)
        self.last_checkpoint: Path | None = None
        self.finished = False  # resumed from a checkpoint at the last step: nothing to train or write
        self.losses: list[float] = []  # per optimiser step, averaged over micro-batches and processes
        self.logs: list[dict] = []  # what was logged at each optimiser step
        self.hub_repo: str | None = None  # `--push_to_hub`: the repository, checked in setup

    # ------------------------------------------------------------------------------------------
    # setup: the order matters -- accelerator (process index, device, precision) first; inputs are
    # checked before anything heavy; class images before LoRA (they sample the base model); the
    # step count (from the data) before Flat-LoRA and the scheduler; models on their device before
    # Flat-LoRA (it caches weight norms there); resume last, once every stateful object exists.

    def setup(self) -> None:
        cfg = self.config
        self.accelerator = self._setup_accelerator()
        self.weight_dtype = WEIGHT_DTYPES[self.accelerator.mixed_precision]
        if self.accelerator.is_main_process:
            for path in ckpt.clean_output_dir(self.output_dir):
                logger.info("Removed `%s`, left by a killed run.", path)
        self.accelerator.wait_for_everyone()
        self.model_path, self.resume_dir = self._check_inputs()
        self._setup_seed()
        self.components = self._setup_models()
        self.denoiser = self.components.family.denoiser  # `unet` or `transformer`
        self.objective = self._setup_objective()
        if cfg.data.with_prior_preservation:
            self._setup_class_images()
        self.trained = self._setup_lora()
        self.dataset, self.dataloader = self._setup_data()
        self.max_train_steps, self.num_epochs = self._setup_steps()
        self.optimizer, self.lr_scheduler = self._setup_optimizer()
        prepared = self.accelerator.prepare(*self.trained.values(), self.optimizer, self.dataloader)
        self.wrapped = dict(zip(self.trained, prepared[: len(self.trained)], strict=True))
        self.optimizer, self.dataloader = prepared[len(self.trained):]
        self.perturbers = self._setup_flat_lora()
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if not cfg.lora.train_text_encoder:  # frozen encoders: every prompt's embedding once, up front
            self._prompt_embeds(self.dataset.prompts())
        if self.resume_dir is not None:
            try:
                self._load_checkpoint(self.resume_dir)
            except ckpt.CheckpointError as err:
                raise DreamBoothError([str(err)]) from err
        self.finished = self.resume_dir is not None and self.global_step >= self.max_train_steps
        if self.finished:
            logger.warning(ckpt.finished_message(self.resume_dir, self.global_step, self.max_train_steps))
            return  # nothing to train: the trackers and `config.yaml` stay as they are
        self._setup_trackers()

    def _setup_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        cfg = self.config
        report_to = None if cfg.logging.report_to == "none" else cfg.logging.report_to
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
            mixed_precision=cfg.memory.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / cfg.logging.logging_dir)),
            cpu=_cpu_data_parallel(),
            # SDXL's first text encoder: its last layer feeds nothing used, so its LoRA gets no gradient.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.lora.train_text_encoder)],
        )
        if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
            raise DreamBoothError(["`--mixed_precision fp16` needs a CUDA GPU; use `bf16` or `no` on "
                                   f"{accelerator.device.type}."])
        if cfg.memory.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        return accelerator

    def _check_inputs(self) -> tuple[str, Path | None]:
        """Every file-level problem at once: base model, instance/class images, resume checkpoint, Hub access."""
        cfg, errors = self.config, []
        model_path, family, model_defaults = cfg.model.pretrained_model_name_or_path, "sd", {}
        try:
            with self.accelerator.main_process_first():  # `tiny:` models are built once
                model_path = resolve_model_path(model_path)
            index = read_model_index(model_path, cfg.model.revision, cfg.model.cache_dir)
            found = detect_family(index, model_path)
            denoiser = read_denoiser_config(model_path, index, found, cfg.model.revision, cfg.model.cache_dir)
            family, guidance = found.name, bool(denoiser.get("guidance_embeds"))
            errors += cfg.family_errors(family, guidance_embeds=guidance, num_blocks=denoiser.get("num_layers"),
                                        model=cfg.model.pretrained_model_name_or_path)
            model_defaults = {"lora_target_modules": list(found.lora_targets),
                              "guidance_scale": FLUX_GUIDANCE_SCALE if guidance else None}
        except ModelError as err:
            errors.append(str(err))
        if cfg.lora.lora_layers is not None:  # diffusers' SD3/FLUX-script spelling of `--lora_target_modules`
            cfg = cfg.resolved(lora_target_modules=cfg.lora.lora_layers, lora_layers=None)
        self.config = cfg = cfg.with_family_defaults(family, **model_defaults)  # before the data is read
        if cfg.checkpoint.push_to_hub:  # before any work: an upload that cannot happen is known now
            try:
                self.hub_repo = hub.check_access(cfg.checkpoint.hub_model_id, self.output_dir, cfg.checkpoint.hub_token)
            except hub.HubError as err:
                errors.append(str(err))
        resume_dir = None
        try:
            resume_dir = ckpt.resolve_resume(cfg.checkpoint.resume_from_checkpoint, self.output_dir)
            if resume_dir is not None:
                self._adopt_seed(ckpt.read_state(resume_dir)["seed"])  # before the data: it is seeded
        except ckpt.CheckpointError as err:
            errors.append(str(err))
        try:  # decodes every instance image: unreadable ones are named here
            self._instance_dataset = db_data.DreamBoothDataset(self._instance_records(), self._data_config())
        except db_data.DataError as err:
            errors.append(str(err))
        if cfg.data.with_prior_preservation:
            class_dir = Path(cfg.data.class_data_dir)
            if class_dir.exists() and not class_dir.is_dir():
                errors.append(f"`--class_data_dir` `{class_dir}` is a file; give a folder (created if missing).")
        if errors:
            raise DreamBoothError(errors)
        if cfg.checkpoint.resume_from_checkpoint == "latest" and resume_dir is None:
            logger.info("No checkpoint in `%s`: starting a new run.", self.output_dir)
        return model_path, resume_dir

    def _adopt_seed(self, saved: int) -> None:
        """A resumed run keeps its checkpoint's seed, unless `--seed` says otherwise."""
        if not self.seed_given:
            self.seed = saved
        elif saved != self.seed:
            logger.warning("Resuming with `--seed` %d, not the checkpoint's %d: the rest of the run draws other "
                           "noise than the interrupted run would have.", self.seed, saved)

    def _setup_seed(self) -> None:
        """Seed the global RNG: LoRA initialisation (the same on every process) and dropout."""
        from accelerate.utils import set_seed

        set_seed(self.seed)

    def _setup_models(self) -> Components:
        cfg = self.config.model
        components = load_components(
            self.model_path, revision=cfg.revision, variant=cfg.variant, cache_dir=cfg.cache_dir,
            vae_path=cfg.pretrained_vae_model_name_or_path, prediction_type=cfg.prediction_type,
            weight_dtype=self.weight_dtype, max_sequence_length=cfg.max_sequence_length,
        )
        device = self.accelerator.device
        for model in (*components.text_encoders, components.vae, components.denoiser):
            model.to(device)
        if self.config.memory.enable_xformers_memory_efficient_attention:
            components.denoiser.enable_xformers_memory_efficient_attention()
        return components

    def _setup_objective(self) -> DDPMObjective | FlowMatchingObjective:
        """The family's training objective with this run's loss settings."""
        c, optim = self.components, self.config.optim
        prior_weight = self.config.data.prior_loss_weight
        if c.family.objective == "ddpm":
            return DDPMObjective(c.noise_scheduler, optim.snr_gamma, prior_weight)
        return FlowMatchingObjective(c.noise_scheduler, weighting_scheme=optim.weighting_scheme,
                                     logit_mean=optim.logit_mean, logit_std=optim.logit_std,
                                     mode_scale=optim.mode_scale, precondition_outputs=optim.precondition_outputs,
                                     prior_loss_weight=prior_weight)

    def _setup_class_images(self) -> None:
        """Generate the missing class images with the base model (main process; the others wait)."""
        from flatlora_diffusion.sampling import load_pipeline, pipeline_from_models

        cfg, c, model = self.config.data, self.components, self.config.model
        if self.accelerator.is_main_process:
            if cfg.prior_generation_precision is None:  # the training models, in their dtype
                pipe = pipeline_from_models(
                    c.path, denoiser={self.denoiser: c.denoiser}, vae=c.vae, device=self.accelerator.device,
                    dtype=self.weight_dtype, text_encoders=c.text_encoder_map, revision=model.revision,
                    variant=model.variant,
                )
            else:  # a separate copy in the asked precision (`no` is fp32, as in diffusers)
                dtype = WEIGHT_DTYPES.get(cfg.prior_generation_precision, torch.float32)
                pipe = load_pipeline(c.path, device=self.accelerator.device, dtype=dtype, revision=model.revision,
                                     variant=model.variant, vae=model.pretrained_vae_model_name_or_path)
            db_data.generate_class_images(
                pipe, cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images,
                sample_batch_size=cfg.sample_batch_size, steps=cfg.class_num_inference_steps, seed=self.seed,
                resolution=max(cfg.resolution, 64),  # the sampler's minimum side
            )
            del pipe
        self.accelerator.wait_for_everyone()

    def _setup_lora(self) -> dict[str, nn.Module]:
        """Add the LoRA adapters; returns the trained models by pipeline component name."""
        from peft import LoraConfig, inject_adapter_in_model

        cfg, c = self.config.lora, self.components

        def lora(targets: list[str], init: str | bool) -> LoraConfig:
            return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, use_dora=cfg.use_dora,
                              use_rslora=cfg.use_rslora, init_lora_weights=init, target_modules=targets)

        trained = {self.denoiser: c.denoiser}
        if cfg.train_text_encoder:  # the CLIP encoders (T5 stays frozen, as in diffusers)
            trained |= {name: c.text_encoder_map[name] for name in c.family.lora_text_encoders}
        errors = []
        for name, model in trained.items():
            denoiser = name == self.denoiser
            targets = _in_blocks(cfg.lora_target_modules, cfg.lora_blocks) if denoiser else cfg.text_encoder_target_modules
            flag = "--lora_target_modules" if denoiser else "--text_encoder_target_modules"
            try:
                if denoiser:  # diffusers' Gaussian init, as its scripts
                    model.add_adapter(lora(targets, "gaussian"))
                else:  # the same init; through peft itself, as transformers 5's `add_adapter` needs peft >= 0.22
                    config = lora(targets, "gaussian")
                    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
                    model.peft_config = {ADAPTER: config}  # what `get_peft_model_state_dict` reads
            except ValueError as err:
                errors.append(f"`{flag}` {','.join(targets)}: {err}")
        if errors:
            raise DreamBoothError(errors)
        for name, model in trained.items():
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()  # LoRA in fp32 under mixed precision
            if self.config.memory.gradient_checkpointing:
                if name == self.denoiser:
                    model.enable_gradient_checkpointing()
                else:
                    model.gradient_checkpointing_enable()
            model.train()
        return trained

    def _instance_records(self) -> list:
        cfg = self.config.data
        if cfg.dataset_name:
            return db_data.load_hf_dataset(cfg.dataset_name, instance_prompt=cfg.instance_prompt,
                                           image_column=cfg.image_column, caption_column=cfg.caption_column,
                                           config_name=cfg.dataset_config_name, cache_dir=self.config.model.cache_dir)
        return db_data.scan_instance_dir(cfg.instance_data_dir, cfg.instance_prompt)

    def _data_config(self):
        cfg = self.config.data
        return db_data.DataConfig(resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                                  repeats=cfg.repeats, enable_bucketing=cfg.enable_bucketing,
                                  bucket_step=cfg.bucket_step, max_aspect=cfg.max_aspect,
                                  interpolation=cfg.image_interpolation_mode, skip_bad_images=cfg.skip_bad_images,
                                  seed=self.seed)

    def _setup_data(self):
        cfg = self.config.data
        dataset = self._instance_dataset
        if cfg.with_prior_preservation:
            classes = db_data.scan_image_dir(cfg.class_data_dir, cfg.class_prompt, flag="--class_data_dir")
            dataset = db_data.DreamBoothDataset(dataset.instance, self._data_config(), classes[: cfg.num_class_images])
        self.batch_sampler = db_data.BucketBatchSampler(dataset.bucket_ids, self.config.optim.train_batch_size,
                                                        seed=self.seed, shuffle=True)
        # Its own generator: starting an epoch must not draw from the global RNG (LoRA dropout's),
        # or a resumed run, which starts its epoch anew, would see other dropout masks.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.batch_sampler,
                                             collate_fn=db_data.collate_examples,
                                             num_workers=cfg.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(self.seed))
        return dataset, loader

    def _setup_steps(self) -> tuple[int, int]:
        """Optimiser steps and epochs. Flat-LoRA's ramp and the lr schedule follow optimiser steps."""
        cfg = self.config.optim
        batches_per_process = math.ceil(len(self.dataloader) / self.accelerator.num_processes)
        self.steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
        max_steps = cfg.max_train_steps or cfg.num_train_epochs * self.steps_per_epoch
        epochs = math.ceil(max_steps / self.steps_per_epoch)
        flat = self.config.flat
        resolved = {"seed": self.seed, "max_train_steps": max_steps, "num_train_epochs": epochs,
                    "lora_alpha": self.config.lora.alpha, "flat_total_steps": flat.total_steps or max_steps,
                    "flat_seed": self.seed if flat.seed is None else flat.seed}
        self.config = self.config.resolved(**resolved)
        return max_steps, epochs

    def _setup_optimizer(self):
        from diffusers.optimization import get_scheduler

        cfg, lora = self.config.optim, self.config.lora
        scale = cfg.gradient_accumulation_steps * cfg.train_batch_size * self.accelerator.num_processes
        lr = cfg.learning_rate * (scale if cfg.scale_lr else 1)
        te_lr = (lora.text_encoder_lr or cfg.learning_rate) * (scale if cfg.scale_lr else 1)
        groups = []
        for name, model in self.trained.items():
            params = [p for p in model.parameters() if p.requires_grad]
            denoiser = name == self.denoiser
            groups.append({"params": params, "lr": lr if denoiser else te_lr,
                           "weight_decay": cfg.adam_weight_decay if denoiser else cfg.adam_weight_decay_text_encoder})
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        if cfg.optimizer == "prodigy":
            import prodigyopt

            if lr <= 0.1:
                logger.warning("Prodigy adapts the step size: `--learning_rate` is usually 1.0 with it, got %g.", lr)
            optimizer = prodigyopt.Prodigy(groups, betas=betas, beta3=cfg.prodigy_beta3, eps=cfg.adam_epsilon,
                                           decouple=cfg.prodigy_decouple,
                                           use_bias_correction=cfg.prodigy_use_bias_correction,
                                           safeguard_warmup=cfg.prodigy_safeguard_warmup)
        elif cfg.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(groups, betas=betas, eps=cfg.adam_epsilon)
        else:
            optimizer = torch.optim.AdamW(groups, betas=betas, eps=cfg.adam_epsilon)
        # Stepped by hand once per optimiser step (not prepared), whatever the number of processes.
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                  num_training_steps=self.max_train_steps, num_cycles=cfg.lr_num_cycles,
                                  power=cfg.lr_power)
        return optimizer, scheduler

    def _setup_flat_lora(self) -> dict[str, FlatLoraPerturber]:
        """One perturber per trained model, keyed by this process's index (ρ = 0: none).

        Each text encoder gets its own noise seed, derived from the UNet's, so that no two models
        draw the same noise.
        """
        flat = self.config.flat
        if flat.rho == 0:
            return {}
        return {name: prepare_flat_lora(self.accelerator, model,
                                        flat if index == 0 else replace(flat, seed=mix_seed(flat.seed, index)))
                for index, (name, model) in enumerate(self.wrapped.items())}

    def _setup_trackers(self) -> None:
        if self.accelerator.is_main_process:
            header = ("Resolved configuration of this run. Reproduce it with:\n"
                      "  python train_dreambooth_flatlora.py --config " + str(self.output_dir / "config.yaml"))
            self.config.save_yaml(self.output_dir / "config.yaml", header=header)
        if self.config.logging.report_to != "none":
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in self.config.to_flags().items()}
            self.accelerator.init_trackers(self.config.logging.tracker_project_name, config=hparams)

    # ------------------------------------------------------------------------------------------
    # train

    def train(self) -> None:
        if self.finished:
            return
        cfg, acc = self.config, self.accelerator
        total_batch = cfg.optim.train_batch_size * acc.num_processes * cfg.optim.gradient_accumulation_steps
        logger.info("Training %s for %d steps (%d epochs, %d images, total batch %d), Flat-LoRA rho=%g (%s)%s.",
                    self.components.family.name, self.max_train_steps, self.num_epochs, len(self.dataset),
                    total_batch, cfg.flat.rho, cfg.flat.schedule,
                    f", resumed at step {self.global_step}" if self.global_step else "")
        progress = tqdm(total=self.max_train_steps, initial=self.global_step, desc="steps",
                        disable=not acc.is_local_main_process)
        step_losses: list[torch.Tensor] = []
        while self.global_step < self.max_train_steps:
            # The sampler's epoch gives the batches' (epoch, index) keys: order, crops, flips. accelerate
            # re-applies its own epoch counter when iteration starts, so set both.
            self.dataloader.set_epoch(self.epoch)
            self.batch_sampler.set_epoch(self.epoch)
            loader = self.dataloader
            if self.batches_done:
                loader = acc.skip_first_batches(self.dataloader, self.batches_done)
            for batch in loader:
                step_losses.append(self.train_step(batch))
                if not acc.sync_gradients:
                    continue
                self._end_of_step(step_losses, progress)
                step_losses = []
                if self.global_step >= self.max_train_steps:
                    break
            else:
                self._end_of_epoch()
        progress.close()
        acc.wait_for_everyone()

    def train_step(self, batch: dict) -> torch.Tensor:
        """One micro-batch: forward, backward and, on an optimiser step's last micro-batch, the update."""
        acc, cfg = self.accelerator, self.config.optim
        for perturber in self.perturbers.values():
            perturber.set_step(self.global_step)  # idempotent within the optimiser step
        with acc.accumulate(*self.wrapped.values()):
            loss = self._loss(batch, self.batches_done)
            self._check_finite(loss)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self._trainable_params(), cfg.max_grad_norm)
            self.optimizer.step()  # accelerate skips it (and zero_grad) until the last micro-batch
            self.optimizer.zero_grad(set_to_none=True)
        self.batches_done += 1
        if acc.sync_gradients:
            if not acc.optimizer_step_was_skipped:  # an fp16 overflow skips the step
                self.lr_scheduler.step()
            self.global_step += 1
        return loss.detach()

    def _loss(self, batch: dict, batch_index: int) -> torch.Tensor:
        """The loss of one micro-batch; its randomness is keyed by (seed, epoch, batch, process)."""
        c, cfg = self.components, self.config
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, batch_index, self.accelerator.process_index))
        latents = self._latents(batch, gen)  # (B, C, h, w)
        noise = sample_noise(latents, cfg.optim.noise_offset, gen)
        noised = self.objective.add_noise(latents, noise, gen)
        embeds, pooled = self._prompt_embeds(batch["prompts"])
        inputs = DenoiserInput(noised.noisy, noised.timesteps, embeds, pooled, batch, cfg.model.guidance_scale)
        pred = c.family.predict(self.wrapped[self.denoiser], inputs)
        is_class = batch["is_class"].to(pred.device)  # (B,)
        return self.objective.loss(pred, latents, noise, noised, is_class)

    def _latents(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        """Scaled VAE latents in the UNet's dtype, sampled from the posterior with ``gen``."""
        vae, device = self.components.vae, self.accelerator.device
        if self.config.data.cache_latents:
            mean, std = self._cached_posterior(batch)
        else:
            mean, std = self._encode(batch["pixel_values"])
        eps = torch.randn(mean.shape, generator=gen).to(device)
        latents = mean.to(device).float() + std.to(device).float() * eps
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.weight_dtype)

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior, (B, 4, h, w) each."""
        vae = self.components.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.accelerator.device, vae.dtype)).latent_dist
        return dist.mean, dist.std

    def _cached_posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`_encode` through a cache keyed by the data's `cache_keys` (equal keys: equal pixels, so the
        same crop and flip); entries live on the CPU. Each image is encoded alone: VAE outputs vary
        with the batch (~1e-6), and a resumed run first meets an image in another batch."""
        keys = batch["cache_keys"]
        for i, key in enumerate(keys):
            if key not in self._latent_cache:
                mean, std = self._encode(batch["pixel_values"][i:i + 1])
                self._latent_cache[key] = (mean[0].float().cpu(), std[0].float().cpu())
        mean = torch.stack([self._latent_cache[key][0] for key in keys])
        std = torch.stack([self._latent_cache[key][1] for key in keys])
        return mean, std

    def _prompt_embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings of the batch: computed each step when text encoders train, else cached once
        per distinct prompt (frozen encoders give the same embeddings every time)."""
        c = self.components
        if self.config.lora.train_text_encoder:
            return c.encode_prompts(prompts, {name: self.wrapped[name] for name in c.family.lora_text_encoders})
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        if missing:
            with torch.no_grad():
                embeds, pooled = c.encode_prompts(missing)
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = (embeds[i], None if pooled is None else pooled[i])
        embeds = torch.stack([self._prompt_cache[p][0] for p in prompts])
        pooled = None if self._prompt_cache[prompts[0]][1] is None else torch.stack([self._prompt_cache[p][1] for p in prompts])
        return embeds, pooled

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss before it reaches the weights (all processes stop together)."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.gather(finite).min()
        if finite.item() == 1:
            return
        last = f"`{self.last_checkpoint}`" if self.last_checkpoint else "none (no checkpoint was written yet)"
        raise TrainingError(
            f"The loss is {loss.item()} at step {self.global_step + 1} (epoch {self.epoch}, batch "
            f"{self.batches_done}); training stopped before the weights were updated. The last good checkpoint "
            f"is {last}. Lower `--learning_rate`, use `--mixed_precision bf16` instead of fp16, or check the "
            "images; then resume with `--resume_from_checkpoint latest`."
        )

    def _trainable_params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _end_of_step(self, step_losses: list[torch.Tensor], progress) -> None:
        cfg, acc = self.config, self.accelerator
        loss = torch.stack(step_losses).mean()
        if acc.num_processes > 1:
            loss = acc.gather(loss.reshape(1)).mean()
        self.losses.append(loss.item())
        logs = {"loss": self.losses[-1], "lr": self.lr_scheduler.get_last_lr()[0]}
        for name, perturber in self.perturbers.items():
            stats = perturber.stats()
            logs |= stats if name == self.denoiser else {f"{k}_{name}": v for k, v in stats.items()}
        if not self.perturbers:
            logs["flat_lora/rho_t"] = 0.0
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", rho_t=f"{logs['flat_lora/rho_t']:.3g}")
        acc.log(logs, step=self.global_step)
        self.logs.append(logs)
        last = self.global_step >= self.max_train_steps
        if last or self.global_step % cfg.checkpoint.checkpointing_steps == 0:
            self.save_checkpoint()  # at the last step too: `latest` then knows the run is complete
        if last:
            return  # the final save and validation follow
        steps = cfg.validation.validation_steps
        if steps and self.global_step % steps == 0:
            self.validate(f"step-{self.global_step:06d}")

    def _end_of_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0
        every = self.config.validation.validation_epochs
        if every and self.epoch % every == 0 and self.global_step < self.max_train_steps:
            self.validate(f"epoch-{self.epoch:04d}")

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _lora_views(self) -> dict[str, torch.Tensor]:
        """Every trained tensor under its name in `pytorch_lora_weights.safetensors`, as a view of the
        parameter: copying into the views loads a checkpoint."""
        from peft.utils import get_peft_model_state_dict

        from flatlora_diffusion.adapters import file_state_dict

        views = {}
        for name, model in self.trained.items():
            state = file_state_dict(get_peft_model_state_dict(model, adapter_name=ADAPTER), self.components.family.name)
            views |= {f"{name}.{key}": value for key, value in state.items()}
        return views

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-STEP`` via a temporary folder and a rename; prune beyond the limit."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{self.global_step}"
        tmp = ckpt.temporary_dir(self.output_dir, self.global_step)
        if acc.is_main_process:
            if tmp.exists():  # left by a run killed while writing this step's checkpoint
                ckpt.remove(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(ckpt.rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
        if acc.is_main_process:
            self._save_adapter(tmp, published_as=final)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            if self.perturbers:  # σ of the current draw (rank-independent): exact resume inside an interval
                torch.save({name: p.state_dict() for name, p in self.perturbers.items()}, tmp / ckpt.FLAT_LORA_NAME)
        acc.wait_for_everyone()
        if acc.is_main_process:
            epoch, done = self.epoch, self.batches_done
            if done >= len(self.dataloader):  # the step ended the epoch: resume at the next one
                epoch, done = epoch + 1, 0
            state = {"format_version": ckpt.FORMAT_VERSION, "global_step": self.global_step, "epoch": epoch,
                     "batches_done": done, "seed": self.seed, "num_processes": acc.num_processes,
                     "max_train_steps": self.max_train_steps, "losses": self.losses,
                     "flat_lora": self.config.flat.to_dict(), "config": self.config.to_flags()}
            (tmp / ckpt.STATE_NAME).write_text(json.dumps(state, indent=2))  # last: marks it complete
            ckpt.publish(tmp, final)
            for old in ckpt.prune(self.output_dir, self.config.checkpoint.checkpoints_total_limit):
                logger.info("Removed old checkpoint `%s`.", old)
            logger.info("Saved checkpoint `%s`.", final)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def _load_checkpoint(self, path: Path) -> None:
        """Restore LoRA weights, optimiser, scheduler, scaler, RNG and the position in the data."""
        state = ckpt.read_state(path)
        views = self._lora_views()
        tensors = ckpt.load_tensors(path, {k: v.shape for k, v in views.items()})
        optimizer_state = ckpt.load_torch(path, "optimizer.pt")
        scheduler_state = ckpt.load_torch(path, "lr_scheduler.pt")
        rank = self.accelerator.process_index
        rng_file = f"rng_state_{rank}.pt" if (path / f"rng_state_{rank}.pt").is_file() else "rng_state_0.pt"
        rng = ckpt.load_torch(path, rng_file) if (path / rng_file).is_file() else None
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as err:
            raise DreamBoothError([f"`--resume_from_checkpoint` `{path}`: the optimiser state does not fit this run "
                                   f"({err}); resume with the same `--optimizer` and `--train_text_encoder`."]) from err
        with torch.no_grad():
            for key, tensor in tensors.items():
                views[key].copy_(tensor)
        self.lr_scheduler.load_state_dict(scheduler_state)
        if self.accelerator.scaler is not None and (path / "scaler.pt").is_file():
            self.accelerator.scaler.load_state_dict(ckpt.load_torch(path, "scaler.pt"))
        if state["num_processes"] != self.accelerator.num_processes:
            logger.warning("Checkpoint written with %d processes, resuming with %d: the data position is "
                           "approximate.", state["num_processes"], self.accelerator.num_processes)
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.global_step, self.epoch, self.batches_done = state["global_step"], state["epoch"], state["batches_done"]
        self._load_flat_lora_state(path)
        self.losses = list(state.get("losses", []))
        self.last_checkpoint = path
        logger.info("Resumed from `%s` at step %d (epoch %d, batch %d).", path, self.global_step, self.epoch,
                    self.batches_done)

    def _load_flat_lora_state(self, path: Path) -> None:
        """The perturbers' current draw, so that a step inside a `--flat_interval` keeps its σ."""
        if not self.perturbers:
            return
        if not (path / ckpt.FLAT_LORA_NAME).is_file():
            if self.global_step % self.config.flat.interval:
                logger.warning("`%s` has no `%s`: the σ of the Flat-LoRA draw in progress is recomputed from "
                               "the current LoRA weights (the resume is not exact).", path, ckpt.FLAT_LORA_NAME)
            return
        states = ckpt.load_torch(path, ckpt.FLAT_LORA_NAME)
        for name, perturber in self.perturbers.items():
            try:
                perturber.load_state_dict(states[name])
            except (KeyError, ValueError) as err:
                raise DreamBoothError([f"`--resume_from_checkpoint` `{path}`: `{ckpt.FLAT_LORA_NAME}` does not fit "
                                       f"this run ({err}); resume with the same `--train_text_encoder` and "
                                       "`--lora_target_modules`."]) from err

    # ------------------------------------------------------------------------------------------
    # validation and saving

    def _sample_settings(self) -> list:
        """One `SampleSettings` per validation prompt (`--validation_prompt` first)."""
        from flatlora_diffusion.sampling import SampleSettings

        v, res = self.config.validation, self.config.data.resolution
        size = max(res, 64)  # the sampler's minimum side (the tiny UNets' native size)
        return [SampleSettings(prompt=prompt, negative_prompt=v.validation_negative_prompt,
                               num_images=v.num_validation_images, seed=self.seed,
                               steps=v.validation_num_inference_steps, guidance_scale=v.validation_guidance_scale,
                               width=size, height=size) for prompt in v.prompts]

    @staticmethod
    def _stem(index: int) -> str:
        """File stem of the images of validation prompt `index`: `image` for the first, then `prompt01`, ..."""
        return "image" if index == 0 else f"prompt{index:02d}"

    def validate(self, tag: str) -> list[Path]:
        """Sample the validation prompt with the in-memory adapter (main process; others wait)."""
        if not self.config.validation.validation_prompt:
            return []
        from flatlora_diffusion.sampling import generate_validation, pipeline_from_models, save_images

        paths: list[Path] = []
        if self.accelerator.is_main_process:
            c = self.components
            if getattr(self, "_validation_pipe", None) is None:
                self._validation_pipe = pipeline_from_models(
                    c.path, denoiser={self.denoiser: c.denoiser}, vae=c.vae, device=self.accelerator.device,
                    dtype=self.weight_dtype, text_encoders=c.text_encoder_map, revision=self.config.model.revision,
                    variant=self.config.model.variant,
                )
            start, images = time.perf_counter(), []
            for index, settings in enumerate(self._sample_settings()):
                with torch.random.fork_rng(devices=[]), self.accelerator.autocast():
                    batch = generate_validation(self._validation_pipe, settings, adapter_name=ADAPTER)
                paths += save_images(batch, self.output_dir / "validation" / tag, self._stem(index), settings,
                                     extra={"step": self.global_step, "base_model": c.path})
                images += batch
            self._log_images(images, tag)
            logger.info("Validation `%s`: %d images in %.1f s.", tag, len(images), time.perf_counter() - start)
        self.accelerator.wait_for_everyone()
        return paths

    def _log_images(self, images, tag: str) -> None:
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                array = np.stack([np.asarray(image) for image in images])
                tracker.writer.add_images(f"validation/{tag.split('-')[0]}", array, self.global_step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                prompts = [p for p in self.config.validation.prompts for _ in range(self.config.validation.num_validation_images)]
                tracker.log({"validation": [wandb.Image(image, caption=prompt)
                                            for image, prompt in zip(images, prompts, strict=True)]},
                            step=self.global_step)

    def _save_adapter(self, folder: Path, kohya: bool = False, published_as: Path | None = None):
        """The LoRA weights as a diffusers adapter folder (weights + `adapter_info.json`); returns its info.
        `published_as`: the final name of a temporary `folder`."""
        import diffusers

        from flatlora_diffusion import adapters

        cfg, c = self.config, self.components
        training = {
            "instance_prompt": cfg.data.instance_prompt, "class_prompt": cfg.data.class_prompt,
            "with_prior_preservation": cfg.data.with_prior_preservation, "steps": self.global_step,
            "seed": self.seed, "learning_rate": cfg.optim.learning_rate, "lr_scheduler": cfg.optim.lr_scheduler,
            "train_batch_size": cfg.optim.train_batch_size, "num_processes": self.accelerator.num_processes,
            "gradient_accumulation_steps": cfg.optim.gradient_accumulation_steps,
            "resolution": cfg.data.resolution, "mixed_precision": self.accelerator.mixed_precision,
            "final_loss": self.losses[-1] if self.losses else None,
        }
        return adapters.save_adapter(
            folder, pipeline_class=getattr(diffusers, c.family.pipeline_class), denoiser=(self.denoiser, c.denoiser),
            text_encoders={name: model for name, model in self.trained.items() if name != self.denoiser},
            base_model=cfg.model.pretrained_model_name_or_path,
            prediction_type=c.noise_scheduler.config.get("prediction_type", c.family.objective),
            lora_config=asdict(cfg.lora) | {"lora_alpha": cfg.lora.alpha},
            flat_lora=cfg.flat.to_dict() if cfg.flat.rho > 0 else None,
            training=training, kohya=kohya, adapter_name=ADAPTER, published_as=published_as,
        )

    def save(self) -> Path:
        """Write the adapter (+ kohya file, model card); then sample it reloaded from disk.

        A finished run that is resumed keeps its files; only an adapter that a kill after the last
        checkpoint left unwritten is written."""
        from flatlora_diffusion import adapters

        acc = self.accelerator
        out = self.output_dir / adapters.WEIGHTS_NAME
        if acc.is_main_process and not (self.finished and self._adapter_saved()):
            if self.finished:
                logger.warning("`%s` lacks the adapter of step %d (the run was killed after its last checkpoint): "
                               "writing it now.", self.output_dir, self.global_step)
            info = self._save_adapter(self.output_dir, kohya=self.config.checkpoint.output_kohya_format)
            images = self._final_validation() if self.config.validation.final_validation else []
            adapters.write_model_card(self.output_dir, info, images, hub_repo=self.hub_repo)
            logger.info("Saved the adapter to `%s`.", out)
            if self.hub_repo is not None:
                self._push()
        acc.wait_for_everyone()
        return out

    def _adapter_saved(self) -> bool:
        """Whether the output dir holds this step's adapter and its model card (the last file written)."""
        from flatlora_diffusion import adapters

        try:
            info = adapters.read_adapter_info(self.output_dir)
        except adapters.AdapterError:
            return False
        return info.training.get("steps") == self.global_step and (self.output_dir / adapters.CARD_NAME).is_file()

    def _push(self) -> None:
        """Upload the output folder (`--push_to_hub`); a failure keeps everything on disk and says how to retry."""
        try:
            url = hub.push(self.output_dir, self.hub_repo, self.config.checkpoint.hub_token)
        except Exception as err:  # network or Hub errors of any kind: the run's outputs are safe on disk
            raise hub.HubError(f"`--push_to_hub`: the upload to `{self.hub_repo}` failed ({err}). Everything is in "
                               f"`{self.output_dir}`; upload it with `hf upload {self.hub_repo} {self.output_dir}`.") from err
        logger.info("Pushed `%s` to %s.", self.output_dir, url)

    def _final_validation(self) -> list[Path]:
        """Load the saved adapter into a fresh pipeline through the public API and sample it."""
        if not self.config.validation.validation_prompt:
            return []
        from flatlora_diffusion.adapters import load_adapter
        from flatlora_diffusion.sampling import generate, load_pipeline, save_images

        cfg = self.config.model
        vae = cfg.pretrained_vae_model_name_or_path
        pipe = load_pipeline(self.components.path, device=self.accelerator.device, dtype=self.weight_dtype,
                             revision=cfg.revision, variant=cfg.variant, vae=vae)
        load_adapter(pipe, self.output_dir, "dreambooth")
        images, paths = [], []
        for index, settings in enumerate(self._sample_settings()):
            with torch.random.fork_rng(devices=[]), self.accelerator.autocast():
                batch = generate(pipe, settings, adapters={"dreambooth": 1.0})
            paths += save_images(batch, self.output_dir / "validation" / "final", self._stem(index), settings,
                                 extra={"adapter": str(self.output_dir), "base_model": self.components.path})
            images += batch
        self._log_images(images, "final")
        return paths

    def summary(self) -> str:
        """What the run wrote and what to run next (the app, the eval), for the end of the command."""
        import shlex

        out, cfg = self.output_dir, self.config
        base = cfg.model.pretrained_model_name_or_path
        final = sorted((out / "validation" / "final").glob("*.png"))
        checkpoints = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                             key=lambda p: int(p.name.split("-")[-1]))
        head = (f"Nothing to train: the run was already complete at step {self.global_step} (raise `--max_train_steps` "
                f"to train further). `{out}/` holds:" if self.finished else f"Done: {self.global_step} steps. Wrote `{out}/`:")
        lines = [head,
                 f"  pytorch_lora_weights.safetensors  the adapter: pipe.load_lora_weights({str(out)!r})",
                 "  README.md, adapter_info.json      model card and settings; config.yaml reruns the run with --config"]
        if final:
            lines.append(f"  validation/final/                 {len(final)} image(s) of the adapter reloaded from disk")
        if checkpoints:
            lines.append(f"  {checkpoints[-1].name + '/':<33} the last checkpoint, also an adapter folder; "
                         "--resume_from_checkpoint latest with a higher --max_train_steps trains on")
        q = shlex.quote
        lines += ["Next:", f"  python app.py --base {q(base)} --adapters {q(str(out))}    # base and adapter side by side"]
        instance = Path(cfg.data.instance_data_dir or "")
        dataset = instance.parent.parent
        if cfg.data.instance_data_dir and (dataset / "prompts_and_classes.txt").is_file():
            encoders = " --dino_model toy:vit --clip_model toy:clip" if base.startswith("toy:") else ""
            lines.append(f"  python -m eval dreambench --base {q(base)} --adapters base=none adapter={q(str(out))} "
                         f"--dataset {q(str(dataset))} --subjects {q(instance.name)}{encoders} "
                         f"--guidance_scale {cfg.validation.validation_guidance_scale:g} --out outputs/eval_{instance.name}")
        else:
            lines.append(f"  python -m eval dreambench --base {q(base)} --adapters adapter={q(str(out))} "
                         "--dataset DREAMBENCH_DIR --subjects SUBJECT    # subject fidelity (DINO, CLIP-I, CLIP-T)")
        return "\n".join(lines)

    def cleanup(self) -> None:
        for perturber in getattr(self, "perturbers", {}).values():
            perturber.remove()
        if getattr(self, "accelerator", None) is not None:
            self.accelerator.end_training()


def _in_blocks(modules: list[str], blocks: list[str] | None) -> list[str] | str:
    """peft targets: ``modules`` everywhere, or (``--lora_blocks``) only inside those `transformer_blocks`
    (a regular expression on the module path, which peft matches in full)."""
    if blocks is None:
        return modules
    names = "|".join(re.escape(m) for m in modules)
    return rf"transformer_blocks\.({'|'.join(str(int(b)) for b in blocks)})\.(.*\.)?({names})"


# Bad input and stopped runs: the entry point prints these without a traceback.
USER_ERRORS = (ConfigError, DreamBoothError, TrainingError, ModelError, ckpt.CheckpointError, db_data.DataError,
               hub.HubError)


def _cpu_data_parallel() -> bool:
    """Several processes (torchrun / `accelerate launch --multi_gpu`) on a machine without GPUs:
    accelerate would otherwise run them as independent single processes; use gloo on CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def run(config: TrainConfig) -> DreamBoothTrainer:
    """setup → train → save → cleanup; returns the trainer (for its losses and paths)."""
    trainer = DreamBoothTrainer(config)
    try:
        trainer.setup()
        trainer.train()
        trainer.save()
    finally:
        trainer.cleanup()
    return trainer


__all__ = ["DreamBoothTrainer", "DreamBoothError", "TrainingError", "USER_ERRORS", "run"]
