"""The trainer's command line, shared by `train_dreambooth_flatlora.py` and `python -m flatlora_diffusion.dreambooth`."""

from __future__ import annotations

import sys

from flatlora_diffusion.dreambooth.config import load_config
from flatlora_diffusion.dreambooth.trainer import USER_ERRORS, run


def main(argv: list[str] | None = None):
    """Parse the flags, then setup → train → save; print what was written; returns the trainer."""
    trainer = run(load_config(argv))
    if trainer.accelerator.is_main_process:
        print(trainer.summary())
    return trainer


def console() -> None:
    """`main` for a shell: bad input or a stopped run exits with its message (it names the flag or file and the fix)."""
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f"error: {err}")
