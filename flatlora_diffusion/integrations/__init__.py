"""Glue between the Flat-LoRA core and training loops (accelerate, transformers `Trainer`)."""
