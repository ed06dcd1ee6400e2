"""SD / SDXL adapters: a fixed held-out set of (image, timestep, noise) triples under the trainer's loss.

The base is loaded once (`load_components`, as the trainer loads it), every adapter is loaded
into one pipeline around it (`adapters.load_adapter`, which refuses adapters of another
architecture) and made active one at a time. The triples are built once from the `--data` images:
each image is resized and centre-cropped as the trainer's data pipeline does, VAE-encoded alone,
and sample ``j`` (image ``j mod #images``) gets a latent drawn from the posterior, noise and a
timestep, all from one generator seeded by ``--seed``. The loss of a triple is the trainer's
(`training_target`, `diffusion_loss`: the plain MSE, no min-SNR weighting), averaged over the set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flatlora_diffusion import adapters as adapter_io
from flatlora_diffusion.dreambooth import data as db_data
from flatlora_diffusion.dreambooth.models import (
    DenoiserInput,
    ModelError,
    load_components,
    resolve_model_path,
)
from flatlora_diffusion.dreambooth.objectives import diffusion_loss, sample_noise, training_target
from flatlora_diffusion.flat_lora import mix_seed
from flatlora_diffusion.flatness.config import FlatnessConfig, FlatnessError
from flatlora_diffusion.flatness.meter import target_layers
from flatlora_diffusion.model_ids import ModelIdError, resolve_model_id
from flatlora_diffusion.quiet import benign_warnings

_TRIPLE_STREAM = 0x464C4154  # "FLAT": the triples' generator, apart from the noise's and the directions'


def same_base(recorded: str | None, given: str, given_path: str) -> bool | None:
    """Whether an adapter's recorded base is ``given``: True, False, or None when it cannot be told.

    Built-in ids and existing folders are compared by their resolved folder; two Hub ids by name; a
    recorded folder that no longer exists (an adapter moved to another machine) cannot be told.
    """
    if not recorded or recorded == given:
        return True if recorded else None
    try:
        path = Path(resolve_model_id(recorded, "base_model"))
    except ModelIdError:
        return False
    if path.exists() and Path(given_path).exists():
        return path.resolve() == Path(given_path).resolve()
    if recorded.startswith(("/", ".", "~")) or Path(given_path).exists():
        return None
    return False  # two Hub ids that differ


class DiffusionWorld:
    """The held-out triples and the loss of a pipeline with its adapters (see the module docstring)."""

    kind = "diffusion"

    def __init__(self, config: FlatnessConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self._embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.infos = self._check_files()
        self._load()
        self._build_triples()

    # -------------------------------------------------------------------------------- checks, loading

    def _check_files(self) -> dict[str, adapter_io.AdapterInfo]:
        """Everything that can be told without the model: adapters, base names, images, prompt."""
        cfg, errors, infos = self.config, [], {}
        try:
            self.path = resolve_model_path(cfg.base)
        except ModelError as err:
            errors.append(str(err).replace("`--pretrained_model_name_or_path`", "`--base`"))
            self.path = cfg.base
        for name, folder in cfg.adapters.items():
            try:
                infos[name] = info = adapter_io.read_adapter_info(folder)
            except adapter_io.AdapterError as err:
                errors.append(f"`--adapters` {name}: {err}")
                continue
            if same_base(info.base_model, cfg.base, self.path) is False:
                errors.append(f"`--adapters` {name}: adapter `{folder}` was trained on `{info.base_model}`, not "
                              f"`--base` `{cfg.base}`; pass the base it was trained on.")
        self.records = []
        prompt = cfg.prompt or self._instance_prompt(infos, errors)
        try:
            self.records = db_data.scan_image_dir(cfg.data, prompt or "", flag="--data")
        except db_data.DataError as err:
            errors.append(str(err))
        if not prompt and any(not record.prompt for record in self.records):
            errors.append("`--prompt` is missing: the adapters record no instance prompt and not every `--data` "
                          "image has a `NAME.txt` caption. Pass `--prompt \"a photo of sks dog\"` (the training "
                          "prompt).")
        if errors:
            raise FlatnessError(errors)
        return infos

    @staticmethod
    def _instance_prompt(infos: dict[str, adapter_io.AdapterInfo], errors: list[str]) -> str | None:
        prompts = {name: info.training.get("instance_prompt") for name, info in infos.items()}
        known = {p for p in prompts.values() if p}
        if len(known) > 1:
            listed = ", ".join(f"{name}: {p!r}" for name, p in prompts.items())
            errors.append(f"The adapters were trained with different instance prompts ({listed}); the same triples "
                          "are used for all of them, so pass `--prompt`.")
            return None
        return next(iter(known), None)

    def _load(self) -> None:
        """The base once, then every adapter into one pipeline; every adapter that does not fit is named."""
        from flatlora_diffusion.sampling import pipeline_from_models

        cfg = self.config
        try:
            self.components = c = load_components(self.path, revision=None, variant=None, cache_dir=None,
                                                  vae_path=None, prediction_type=None, weight_dtype=self.dtype)
        except ModelError as err:
            raise FlatnessError([str(err).replace("`--pretrained_model_name_or_path`", "`--base`")]) from err
        if c.family.objective != "ddpm":
            raise FlatnessError([f"`--base` `{cfg.base}` is {c.family.name.upper()}: the flatness meter measures "
                                 "SD/SDXL (DDPM) adapters and LLM adapters; flow-matching models are not supported."])
        for model in (*c.text_encoders, c.vae, c.denoiser):
            model.to(self.device)
        encoders = c.text_encoder_map
        self.models = {"unet": c.denoiser, **encoders}
        self.pipe = pipeline_from_models(c.path, denoiser={"unet": c.denoiser}, text_encoders=encoders, vae=c.vae,
                                         device=self.device, dtype=self.dtype)
        errors = []
        prediction = c.noise_scheduler.config.prediction_type
        for name, folder in cfg.adapters.items():
            info = self.infos[name]
            if info.prediction_type not in (None, prediction):
                errors.append(f"`--adapters` {name}: adapter `{folder}` was trained with {info.prediction_type} "
                              f"prediction, `--base` `{cfg.base}` predicts {prediction}.")
                continue
            try:
                with benign_warnings():
                    adapter_io.load_adapter(self.pipe, folder, name)
            except adapter_io.AdapterError as err:
                errors.append(f"`--adapters` {name}: {err}")
        if errors:
            self.close()
            raise FlatnessError(errors)

    # -------------------------------------------------------------------------------- the triples

    def resolution(self) -> int:
        """`--resolution`, else the adapters' common training resolution, else the UNet's native size."""
        if self.config.resolution is not None:
            return self.config.resolution
        trained = {info.training.get("resolution") for info in self.infos.values()}
        if len(trained) == 1 and isinstance(next(iter(trained)), int):
            return next(iter(trained))
        return self.components.denoiser.config.sample_size * 8

    def _build_triples(self) -> None:
        """Latents (N, C, h, w), noise, timesteps (N,), noisy latents, targets and prompts, once."""
        cfg, c = self.config, self.components
        size = self.resolution()
        dataset = db_data.DreamBoothDataset(self.records, db_data.DataConfig(resolution=size, center_crop=True,
                                                                             seed=cfg.seed))
        examples = [dataset.example(record, (size, size), 0, i, is_class=False)
                    for i, record in enumerate(dataset.instance)]
        vae = c.vae
        with torch.no_grad():
            posteriors = [vae.encode(e["pixel_values"][None].to(self.device, vae.dtype)).latent_dist for e in examples]
        picks = [j % len(examples) for j in range(cfg.samples)]
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, _TRIPLE_STREAM))
        mean = torch.cat([posteriors[i].mean for i in picks]).float()
        std = torch.cat([posteriors[i].std for i in picks]).float()
        eps = torch.randn(mean.shape, generator=gen).to(self.device)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((mean + std * eps - shift) * vae.config.scaling_factor).to(self.dtype)  # (N, C, h, w)
        noise = sample_noise(latents, 0.0, gen)
        timesteps = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (cfg.samples,), generator=gen)
        self.timesteps = timesteps.to(self.device)
        self.latents, self.noise = latents, noise
        self.noisy = c.noise_scheduler.add_noise(latents, noise, self.timesteps)
        self.target = training_target(c.noise_scheduler, latents, noise, self.timesteps)
        self.prompts = [examples[i]["prompt"] for i in picks]
        self.images = [examples[i]["cache_key"].split("|")[0] for i in picks]
        self.sizes = {"original_sizes": [examples[i]["original_size"] for i in picks],  # SDXL's micro-conditioning
                      "crop_top_lefts": [examples[i]["crop_top_left"] for i in picks]}

    def describe(self) -> dict:
        """What the held-out set is, for the report."""
        return {"kind": self.kind, "family": self.components.family.name, "examples": len(self.prompts),
                "images": sorted(set(self.images)), "prompts": sorted(set(self.prompts)),
                "resolution": self.resolution(), "timesteps": self.timesteps.tolist(),
                "prediction_type": self.components.noise_scheduler.config.prediction_type,
                "loss": "mean over the triples of the per-triple MSE to the training target (no min-SNR weight)"}

    # -------------------------------------------------------------------------------- adapters and loss

    def activate(self, name: str) -> dict:
        """Make adapter ``name`` the only active one; its target layers by name."""
        from flatlora_diffusion.sampling import activate_adapters

        activate_adapters(self.pipe, {name: 1.0})
        self.layers = target_layers(self.models, name)
        return self.layers

    def _text_embeds(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompts' embeddings: recomputed when the active adapter (or its noise) is in a text encoder."""
        if any(not key.startswith("unet.") for key in self.layers):
            return self.components.encode_prompts(self.prompts)
        if self._embeds is None:  # no text-encoder layer active: the base encoders' output, once
            self._embeds = self.components.encode_prompts(self.prompts)
        return self._embeds

    def loss(self) -> float:
        """The mean loss over the triples at the current weights (no gradients)."""
        with torch.no_grad():
            embeds, pooled = self._text_embeds()
            losses = []
            for start in range(0, len(self.prompts), self.config.batch_size):
                part = slice(start, start + self.config.batch_size)
                batch = {key: value[part] for key, value in self.sizes.items()}
                inputs = DenoiserInput(self.noisy[part], self.timesteps[part], embeds[part],
                                       None if pooled is None else pooled[part], batch)
                pred = self.components.family.predict(self.components.denoiser, inputs)
                losses.append(diffusion_loss(pred, self.target[part], self.timesteps[part],
                                             self.components.noise_scheduler, None))
            return torch.cat(losses).mean().item()

    def close(self) -> None:
        """Unload every adapter: the base modules are as loaded."""
        from flatlora_diffusion.sampling import active_adapter_names

        if getattr(self, "pipe", None) is not None and active_adapter_names(self.pipe):
            self.pipe.unload_lora_weights()
