"""Training objectives: what noise is added to the latents and what loss the denoiser's output gets.

* `DDPMObjective` (SD 1.x/2.x, SDXL): integer timesteps drawn uniformly, ``scheduler.add_noise``,
  an epsilon or velocity target, optional min-SNR weighting (Hang et al. 2023);
* `FlowMatchingObjective` (SD3/3.5, FLUX.1): rectified flow as diffusers' DiT DreamBooth scripts,
  through ``diffusers.training_utils``: timesteps from ``compute_density_for_timestep_sampling``
  (uniform, logit-normal or mode), ``x_t = (1 - σ) x_0 + σ ε``, the velocity target ``ε - x_0``
  (or ``x_0`` with SD3's `--precondition_outputs`), weighted by ``compute_loss_weighting_for_sd3``.

Both add the prior-preservation loss of the class samples, ``prior_loss_weight`` times their own
loss. Every random draw comes from the generator the trainer passes, keyed by the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flatlora_diffusion.dreambooth.models import ModelError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass
class NoisedLatents:
    """Noisy latents and the timesteps (and, for flow matching, the σ) they were drawn at."""

    noisy: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,)
    sigmas: torch.Tensor | None = None  # (B, 1, 1, 1), flow matching only


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


class DDPMObjective:
    """Noise / velocity prediction with uniform timesteps, as diffusers' SD and SDXL DreamBooth scripts."""

    def __init__(self, noise_scheduler, snr_gamma: float | None, prior_loss_weight: float) -> None:
        self.noise_scheduler = noise_scheduler
        self.snr_gamma = snr_gamma
        self.prior_loss_weight = prior_loss_weight

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> NoisedLatents:
        """Timesteps uniform over the scheduler's training steps, then ``scheduler.add_noise``."""
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
        return NoisedLatents(self.noise_scheduler.add_noise(latents, noise, timesteps), timesteps)

    def loss(self, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, noised: NoisedLatents,
             is_class: torch.Tensor) -> torch.Tensor:
        """`dreambooth_loss` of the batch (a scalar)."""
        target = training_target(self.noise_scheduler, latents, noise, noised.timesteps)
        return dreambooth_loss(pred, target, noised.timesteps, is_class, self.noise_scheduler, self.snr_gamma,
                               self.prior_loss_weight)


class FlowMatchingObjective:
    """Rectified flow matching as diffusers' `train_dreambooth_lora_sd3.py` / `_flux.py`."""

    def __init__(self, noise_scheduler, *, weighting_scheme: str, logit_mean: float, logit_std: float,
                 mode_scale: float, precondition_outputs: bool, prior_loss_weight: float) -> None:
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ModelError(f"`--weighting_scheme` must be one of {', '.join(WEIGHTING_SCHEMES)}, "
                             f"got {weighting_scheme!r}.")
        self.noise_scheduler = noise_scheduler
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs
        self.prior_loss_weight = prior_loss_weight

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> NoisedLatents:
        """u from the weighting scheme's density, the training schedule's timestep and σ at ``u·T``,
        then the straight path ``(1 - σ) x_0 + σ ε``."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, latents.shape[0], logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  generator=generator)
        indices = (u * self.noise_scheduler.config.num_train_timesteps).long()
        timesteps = self.noise_scheduler.timesteps[indices].to(latents.device)
        sigmas = self.noise_scheduler.sigmas[indices].to(latents.device, latents.dtype).reshape(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        return NoisedLatents(noisy, timesteps, sigmas)

    def loss(self, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, noised: NoisedLatents,
             is_class: torch.Tensor) -> torch.Tensor:
        """Weighted MSE to ``ε - x_0`` (or to ``x_0`` of the preconditioned output, SD3); instance mean
        plus ``prior_loss_weight`` times the class mean (the same weighting, as diffusers)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.precondition_outputs:  # the model's velocity turned into an x_0 estimate
            pred = pred * (-noised.sigmas) + noised.noisy
            target = latents
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, noised.sigmas).float()
        per_sample = (weighting * (pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
        instance = ~is_class
        loss = per_sample.new_zeros(())
        if instance.any():
            loss = per_sample[instance].mean()
        if is_class.any():
            loss = loss + self.prior_loss_weight * per_sample[is_class].mean()
        return loss
