"""DreamBooth LoRA fine-tuning of Stable Diffusion 1.x/2.x and SDXL with Flat-LoRA.

    python train_dreambooth_flatlora.py --config configs/demo.yaml            # tiny offline demo
    accelerate launch train_dreambooth_flatlora.py --config configs/sdxl_3d_icons.yaml
    python train_dreambooth_flatlora.py --help                                # every flag

Every flag can be set in the `--config` YAML (keys are flag names); the command line overrides it.
The loop lives in `flatlora_diffusion.dreambooth.trainer`.
"""

import sys

from flatlora_diffusion.dreambooth.config import load_config
from flatlora_diffusion.dreambooth.trainer import USER_ERRORS, run


def main(argv: list[str] | None = None):
    """Parse the flags, then setup → train → save; print what was written; returns the trainer."""
    trainer = run(load_config(argv))
    if trainer.accelerator.is_main_process:
        print(trainer.summary())
    return trainer


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as err:  # bad input or a stopped run: the message names the flag or file and the fix
        sys.exit(f"error: {err}")
