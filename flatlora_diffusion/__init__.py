"""Flat-LoRA fine-tuning toolkit: core perturbation engine, DreamBooth and LLM trainers."""

__version__ = "0.1.0"
