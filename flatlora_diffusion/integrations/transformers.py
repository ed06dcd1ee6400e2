"""Flat-LoRA for a transformers `Trainer` (any subclass: the integration is a callback).

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, optimizers=(loraplus_opt, None))
    add_flat_lora(trainer, FlatLoraConfig(rho=0.05))   # total_steps defaults to the run's max_steps
    trainer.train()

LoRA+ and other optimiser choices are untouched: Flat-LoRA only changes what the forward pass sees.
"""

from __future__ import annotations

import dataclasses

from transformers import Trainer, TrainerCallback

from flatlora_diffusion.flat_lora import FlatLoraConfig, FlatLoraPerturber


class FlatLoraCallback(TrainerCallback):
    """Installs the perturber at train start and moves it to each optimiser step (``state.global_step``)."""

    def __init__(self, config: FlatLoraConfig) -> None:
        self.config = config
        self.perturber: FlatLoraPerturber | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = self.config
        if config.total_steps is None:
            config = dataclasses.replace(config, total_steps=state.max_steps)
        self.perturber = FlatLoraPerturber(model, config, rank=args.process_index)

    def on_step_begin(self, args, state, control, **kwargs):
        # Called once per optimiser step, before its first micro-batch; global_step counts finished steps.
        self.perturber.set_step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.perturber is None or "loss" not in logs:
            return
        stats = self.perturber.stats()
        logs.update(stats)
        # The Trainer appended its copy of `logs` to the history before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, **kwargs):
        self.perturber.remove()
        self.perturber = None


def add_flat_lora(trainer: Trainer, config: FlatLoraConfig) -> FlatLoraCallback:
    """Add Flat-LoRA to ``trainer``; its values are logged with the training loss.

    The callback goes first so that the reporting callbacks (TensorBoard, wandb) see its values.
    """
    callback = FlatLoraCallback(config)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
