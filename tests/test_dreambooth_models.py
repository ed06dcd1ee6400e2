"""The DreamBooth loss (`dreambooth.objectives`): min-SNR and prior preservation as diffusers' scripts."""

from __future__ import annotations

import pytest
import torch

from flatlora_diffusion.dreambooth.objectives import dreambooth_loss


def _batch(prediction_type: str):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 900, 300, 50, 700, 999])
    is_class = torch.tensor([False, False, False, True, True, True])  # instance images first, as diffusers
    return scheduler, pred, target, timesteps, is_class


def _snr(scheduler, timesteps):
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    return alpha_bar / (1 - alpha_bar)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_the_instance_loss_only_and_the_prior_loss_is_plain_mse(prediction_type):
    scheduler, pred, target, timesteps, is_class = _batch(prediction_type)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = _snr(scheduler, timesteps[:3])
    weight = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    expected = (mse[:3] * weight).mean() + 0.5 * mse[3:].mean()  # diffusers: `prior_loss` is F.mse_loss
    loss = dreambooth_loss(pred, target, timesteps, is_class, scheduler, snr_gamma=5.0, prior_loss_weight=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_without_min_snr_or_class_images_it_is_the_mean_squared_error():
    scheduler, pred, target, timesteps, is_class = _batch("epsilon")
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    plain = dreambooth_loss(pred, target, timesteps, is_class, scheduler, snr_gamma=None, prior_loss_weight=1.0)
    assert plain.item() == pytest.approx((mse[:3].mean() + mse[3:].mean()).item(), rel=1e-6)
    no_class = torch.zeros(6, dtype=torch.bool)
    assert dreambooth_loss(pred, target, timesteps, no_class, scheduler, None, 1.0).item() == pytest.approx(
        mse.mean().item(), rel=1e-6)
