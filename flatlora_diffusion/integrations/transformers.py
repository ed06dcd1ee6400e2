"""Flat-LoRA for a transformers `Trainer` (any subclass: the integration is a callback).

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, optimizers=(loraplus_opt, None))
    add_flat_lora(trainer, FlatLoraConfig(rho=0.05))   # total_steps defaults to the run's max_steps
    trainer.train()

LoRA+ and other optimiser choices are untouched: Flat-LoRA only changes what the forward pass sees.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from flatlora_diffusion.flat_lora import FlatLoraConfig, FlatLoraPerturber

STATE_NAME = "flat_lora.pt"  # in each `checkpoint-N` folder: the perturber's draw state
logger = logging.getLogger(__name__)


class FlatLoraCallback(TrainerCallback):
    """Installs the perturber at train start and moves it to each optimiser step (``state.global_step``).

    Each checkpoint gets the perturber's :meth:`~FlatLoraPerturber.state_dict` (``flat_lora.pt``); a
    resumed run loads it from ``resume_from`` (default: ``OUTPUT_DIR/checkpoint-STEP``), so that a
    resume inside a Flat-LoRA ``interval`` keeps the σ of the draw in progress.
    """

    def __init__(self, config: FlatLoraConfig) -> None:
        self.config = config
        self.perturber: FlatLoraPerturber | None = None
        self.resume_from: str | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = self.config
        if config.total_steps is None:
            config = dataclasses.replace(config, total_steps=state.max_steps)
        self.perturber = FlatLoraPerturber(model, config, rank=args.process_index)
        if state.global_step > 0:
            folder = Path(self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}")
            if (folder / STATE_NAME).is_file():
                self.perturber.load_state_dict(torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True))
            elif state.global_step % config.interval:
                logger.warning("`%s` has no `%s`: the σ of the Flat-LoRA draw in progress is recomputed from the "
                               "current LoRA weights (the resume is not exact).", folder, STATE_NAME)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.perturber is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            torch.save(self.perturber.state_dict(), folder / STATE_NAME)

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
