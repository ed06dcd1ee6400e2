"""DreamBooth LoRA training of SD 1.x/2.x and SDXL with Flat-LoRA.

    from flatlora_diffusion.dreambooth import load_config, run
    run(load_config(["--config", "configs/demo.yaml"]))

`config` holds the typed settings (one flag per field), `models` the SD/SDXL-specific pieces,
`data` the images, `checkpoints` the resumable state and `trainer` the loop.
"""

from flatlora_diffusion.dreambooth.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "DreamBoothTrainer", "run"]


def __getattr__(name: str):
    # The trainer imports torch/diffusers/accelerate: load it only when asked for.
    if name in ("DreamBoothTrainer", "run", "DreamBoothError", "TrainingError"):
        from flatlora_diffusion.dreambooth import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
