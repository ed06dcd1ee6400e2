"""Flat-LoRA in a hand-written `accelerate` loop.

    perturber = prepare_flat_lora(accelerator, model, FlatLoraConfig(rho=0.1, total_steps=max_steps))
    for batch in dataloader:
        with accelerator.accumulate(model):
            perturber.set_step(global_step)      # optimiser step, shared by all micro-batches
            loss = compute_loss(model, batch)
            accelerator.backward(loss)
            optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
        if accelerator.sync_gradients:
            global_step += 1
            accelerator.log(perturber.stats(), step=global_step)

The noise depends on (seed, optimiser step, layer, rank) and on σ, taken from the LoRA weights
at the start of each draw: save ``perturber.state_dict()`` with your checkpoints and call
``perturber.load_state_dict(...)`` on resume (needed with ``interval`` > 1, O(m) per layer). The
ramp follows optimiser steps whatever the number of processes.
"""

from __future__ import annotations

from accelerate import Accelerator
from torch import nn

from flatlora_diffusion.flat_lora import FlatLoraConfig, FlatLoraPerturber


def prepare_flat_lora(accelerator: Accelerator, model: nn.Module, config: FlatLoraConfig) -> FlatLoraPerturber:
    """Install Flat-LoRA on the (unwrapped) ``model``, with this process's index as the noise rank."""
    return FlatLoraPerturber(accelerator.unwrap_model(model), config, rank=accelerator.process_index)
