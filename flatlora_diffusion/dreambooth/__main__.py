"""`python -m flatlora_diffusion.dreambooth FLAGS`: the trainer of `train_dreambooth_flatlora.py`, for tools
(the ρ sweep, the toy-world experiment) that run it in a subprocess from an installed package."""

from flatlora_diffusion.dreambooth.cli import console

console()
