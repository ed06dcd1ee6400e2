"""LLM fine-tuning with LoRA or Flat-LoRA through the transformers `Trainer` (the paper's GSM8K, code, chat setups).

    python -m flatlora_diffusion.llm train --config configs/llm_metamath.yaml [--key value ...]
    python -m flatlora_diffusion.llm demo --out runs/llm_demo
    python -m flatlora_diffusion.llm merge --model BASE --adapter RUN/adapter --out RUN/merged
    python -m flatlora_diffusion.llm pretrain OUT_DIR --minutes 40      # the toy base, `toy:llama`
    python -m flatlora_diffusion.llm compare --seeds 0 1 2 --out DIR    # LoRA vs Flat-LoRA, error bars

Modules: `config` (typed sections, YAML + overrides), `data` (loading, prompt templates, label
masking), `train` (the recipe), `synthetic` (GSM8K-style arithmetic problems), `language` (the
pretraining text), `pretrain` (`toy:llama`), `demo`, `compare`.
"""

from flatlora_diffusion.llm.config import ConfigError, LLMError, LLMTrainConfig, load_config

__all__ = ["ConfigError", "LLMError", "LLMTrainConfig", "load_config"]
