"""Tests for `flatlora_diffusion.tiny`: every tiny model loads through the public APIs and runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flatlora_diffusion import tiny
from flatlora_diffusion.tiny import build_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K_TEXT = "Q: Tom has 3 apples.\nA: 3 + 4 = 7\n#### 7"


def _weights(path: Path) -> dict[str, bytes]:
    """Every safetensors file under `path`, keyed by relative path."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*.safetensors"))}


def _generate(pipe) -> np.ndarray:
    """Two denoising steps at 64 px, as numpy images."""
    out = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


@pytest.mark.parametrize(
    ("fixture", "prediction_type"), [("tiny_sd_path", "epsilon"), ("tiny_sd_v_path", "v_prediction")]
)
def test_sd_loads_and_generates(request: pytest.FixtureRequest, fixture: str, prediction_type: str) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    path = request.getfixturevalue(fixture)
    assert type(DiffusionPipeline.from_pretrained(path)) is StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipe.safety_checker is None
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == 64  # native resolution
    assert pipe.tokenizer.model_max_length == 77
    unet_modules = {name.rsplit(".", 1)[-1] for name, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= unet_modules
    assert any(name.endswith("to_out.0") for name, _ in pipe.unet.named_modules())
    te_modules = {name.rsplit(".", 1)[-1] for name, _ in pipe.text_encoder.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "out_proj"} <= te_modules
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_sdxl_loads_and_generates(tiny_sdxl_path: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_path)
    assert type(pipe) is StableDiffusionXLPipeline
    unet, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert pipe.config.force_zeros_for_empty_prompt
    assert pipe.vae.config.scaling_factor == 0.13025
    assert pipe.scheduler.__class__.__name__ == "EulerDiscreteScheduler"
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_sd3_loads_and_generates(tiny_sd3_path: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd3_path)
    assert type(pipe) is StableDiffusion3Pipeline
    assert type(pipe.tokenizer_3).__name__.startswith("T5Tokenizer")  # transformers 5: one class, fast backend
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    transformer = pipe.transformer.config
    # CLIP states (32 + 32) are padded to T5's width; pooled = both CLIP projections.
    assert transformer.joint_attention_dim == pipe.text_encoder_3.config.d_model >= 64
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert (pipe.vae.config.latent_channels, pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (16, 1.5305, 0.0609)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    modules = {name.rsplit(".", 1)[-1] for name, _ in pipe.transformer.named_modules()}
    assert {"to_q", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= modules
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_flux_loads_and_generates(tiny_flux_path: Path) -> None:
    from diffusers import DiffusionPipeline, FluxPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_flux_path)
    assert type(pipe) is FluxPipeline
    transformer = pipe.transformer.config
    assert transformer.in_channels == 4 * pipe.vae.config.latent_channels == 64  # 2x2-packed latents
    assert transformer.guidance_embeds and transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.scheduler.config.use_dynamic_shifting
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_t5_tokenizer_is_character_level_with_t5s_special_ids(tiny_flux_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_flux_path, subfolder="tokenizer_2")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a sks dog", padding="max_length", max_length=16, truncation=True).input_ids
    assert len(ids) == 16 and ids[ids.index(1) + 1:] == [0] * (15 - ids.index(1))  # text, </s>, padding
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a sks dog"


def test_clip_gives_embeddings(tiny_clip_path: Path) -> None:
    from transformers import AutoProcessor, CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip_path)
    assert type(AutoProcessor.from_pretrained(tiny_clip_path)) is CLIPProcessor
    processor = CLIPProcessor.from_pretrained(tiny_clip_path)
    inputs = processor(
        text=["a dog", "a red cube"], images=[Image.new("RGB", (300, 200))], return_tensors="pt", padding=True
    )
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    with torch.no_grad():
        out = model(**inputs)
    dim = model.config.projection_dim
    assert out.image_embeds.shape == (1, dim)
    assert out.text_embeds.shape == (2, dim)
    assert torch.isfinite(out.logits_per_image).all()


def test_dino_gives_cls_token(tiny_dino_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(tiny_dino_path)
    pixels = AutoImageProcessor.from_pretrained(tiny_dino_path)(Image.new("RGB", (300, 200)), return_tensors="pt")
    with torch.no_grad():
        hidden = model(**pixels).last_hidden_state
    assert hidden.shape == (1, 1 + (224 // 16) ** 2, model.config.hidden_size)  # CLS + patches
    assert torch.isfinite(hidden[:, 0]).all()


def test_llama_tokenizer_round_trips(tiny_llama_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    ids = tokenizer(GSM8K_TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == GSM8K_TEXT
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<s>", "</s>", "<pad>"}
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == "<s>user: Q?\nassistant: A</s>\n"


def test_llama_generates(tiny_llama_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    inputs = tokenizer(GSM8K_TEXT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs.input_ids.shape[1] + 4)
    assert isinstance(tokenizer.decode(out[0], skip_special_tokens=True), str)


@pytest.mark.parametrize("kind", tiny.KINDS)
def test_same_seed_writes_identical_weights(tmp_path: Path, kind: str) -> None:
    first = _weights(build_tiny(kind, tmp_path / "a", seed=3))
    assert first
    assert _weights(build_tiny(kind, tmp_path / "b", seed=3)) == first


def test_different_seed_writes_different_weights(tiny_sd_path: Path, tmp_path: Path) -> None:
    other = _weights(build_tiny("sd", tmp_path / "sd", seed=1))
    for name, data in _weights(tiny_sd_path).items():
        assert other[name] != data, name


def test_cli_matches_api(tiny_sd_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli_sd"
    subprocess.run(
        [sys.executable, "-m", "flatlora_diffusion.tiny", "sd", str(out)], cwd=REPO_ROOT, check=True, timeout=120
    )
    assert _weights(out) == _weights(tiny_sd_path)  # default seed 0 in both


def test_non_empty_out_dir_needs_overwrite(tmp_path: Path) -> None:
    out = build_tiny("dino", tmp_path / "dino")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_tiny("dino", out, seed=1)
    build_tiny("dino", out, seed=1, overwrite=True)
    assert _weights(out) == _weights(build_tiny("dino", tmp_path / "dino1", seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dino", "dino1"]  # no temporary leftovers


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash() -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(tiny, "_llama_tokenizer", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_tiny("llama", tmp_path / "llama")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown tiny model kind `sd4`"):
        build_tiny("sd4", tmp_path / "x")
    with pytest.raises(ValueError, match="`prediction_type`"):
        build_tiny("sd", tmp_path / "x", prediction_type="sample")
    with pytest.raises(SystemExit):
        tiny.main(["llama", str(tmp_path / "x"), "--prediction_type", "v_prediction"])
