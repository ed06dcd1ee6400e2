"""Flat-LoRA fine-tuning toolkit: core perturbation engine, DreamBooth and LLM trainers."""

from flatlora_diffusion.quiet import install_log_filters

__version__ = "0.1.0"

install_log_filters()  # known-benign library log lines (see `flatlora_diffusion.quiet`)
