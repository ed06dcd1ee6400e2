"""Shared pytest fixtures: tiny randomly initialised models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatlora_diffusion.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 1.x-style pipeline folder (epsilon prediction, 64 px native)."""
    return build_tiny("sd", tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2.x-style pipeline folder (v-prediction)."""
    return build_tiny("sd", tmp_path_factory.mktemp("tiny") / "sd_v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL pipeline folder (two text encoders, 64 px native)."""
    return build_tiny("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`CLIPModel` + `CLIPProcessor` folder (224 px, patch 32)."""
    return build_tiny("clip", tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="session")
def tiny_dino_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DINO-style `ViTModel` + `ViTImageProcessor` folder (224 px, patch 16)."""
    return build_tiny("dino", tmp_path_factory.mktemp("tiny") / "dino")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`LlamaForCausalLM` + byte-level fast tokenizer folder."""
    return build_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")
