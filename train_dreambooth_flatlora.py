"""DreamBooth LoRA fine-tuning of Stable Diffusion 1.x/2.x and SDXL with Flat-LoRA.

    python train_dreambooth_flatlora.py --config configs/demo.yaml            # tiny offline demo
    accelerate launch train_dreambooth_flatlora.py --config configs/sdxl_3d_icons.yaml
    python train_dreambooth_flatlora.py --help                                # every flag

Every flag can be set in the `--config` YAML (keys are flag names); the command line overrides it.
The loop lives in `flatlora_diffusion.dreambooth.trainer`.
"""

from flatlora_diffusion.dreambooth.cli import console, main

__all__ = ["main"]

if __name__ == "__main__":
    console()
