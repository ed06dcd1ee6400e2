"""Tiny, randomly initialised models in the standard Hugging Face layout.

Each builder writes a complete model folder that loads offline through the same
``from_pretrained`` calls a real checkpoint takes, so tests and demos can run the
real code paths in seconds without downloading weights::

    python -m flatlora_diffusion.tiny sd OUT_DIR [--seed N] [--prediction_type v_prediction]
    python -m flatlora_diffusion.tiny {sdxl,sd3,flux,clip,dino,llama} OUT_DIR [--seed N] [--overwrite]

The models are small but structurally real: SD-style UNets with ``to_q/to_k/to_v/to_out.0``
attention projections, CLIP text encoders with ``q_proj/k_proj/v_proj/out_proj``, a 4-block
(8x) VAE with 4 latent channels and the real scaling factors, and a GQA Llama. The SD3 and FLUX
pipelines have MM-DiT transformers with joint attention (``add_q_proj``, ..., ``to_add_out``),
a 16-channel VAE with the real shift and scaling factors, CLIP encoders and a T5 encoder with a
character-level (Unigram) T5 tokenizer. The same seed writes byte-identical weight files.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from flatlora_diffusion import files

KINDS = ("sd", "sdxl", "sd3", "flux", "clip", "dino", "llama")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Latent side of the UNets: with the 8x VAE the pipelines' default resolution is 8 * 8 = 64 px.
_LATENT_SIZE = 8
_CLIP_MAX_LENGTH = 77  # as every real CLIP tokenizer; without it truncation overflows
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_T5_MAX_LENGTH = 512  # SD3/FLUX pipelines take `max_sequence_length` tokens of T5 (<= 512)
# Beta schedule shared by SD 1.x/2.x and SDXL.
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
_LLAMA_SPECIALS = ("<s>", "</s>", "<pad>")
# Literal text sits inside {{ }}: transformers renders with trim_blocks, which drops a newline after a tag.
_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@contextmanager
def _atomic_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; move it into place only if the body succeeds."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"Output path `{out}` is a file, not a directory; choose another path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory `{out}` exists and is not empty. "
            "Choose another directory or pass `--overwrite` (`overwrite=True`) to replace it."
        )
    with files.atomic_dir(out) as tmp:
        yield tmp


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode alphabet: 256 printable characters, one per byte, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _clip_tokenizer(pad_token: str = _CLIP_EOS):
    """Character-level CLIP tokenizer: the first 512 entries of the real CLIP vocabulary, no merges."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [_CLIP_BOS, _CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=_CLIP_MAX_LENGTH)


def _clip_text_config(tokenizer, hidden_size: int, hidden_act: str):
    """A 2-layer, 2-head CLIP text config sized to `tokenizer`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=hidden_size,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(scaling_factor: float, latent_channels: int = 4, shift_factor: float | None = None):
    """A 4-block VAE: 8x downsampling like SD's, with tiny widths. SD3/FLUX: 16 latent channels,
    a shift factor and no (post-)quantisation convolutions, as their VAEs."""
    from diffusers import AutoencoderKL

    dit = shift_factor is not None
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=_LATENT_SIZE * 8,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not dit,
        use_post_quant_conv=not dit,
    )


def _t5_tokenizer():
    """Character-level T5 tokenizer (a Unigram model, as T5's): pad 0, eos 1, unk 2, like the real one."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    start = "\u2581"  # SentencePiece's word-start mark
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (start, -1.0)]
    vocab += [(c, -2.0) for c in chars] + [(start + c, -1.5) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                          special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def _t5_encoder(tokenizer, d_model: int):
    """A 2-layer, 2-head `T5EncoderModel` sized to `tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config)


def build_tiny_sd(
    out_dir: str | Path, seed: int = 0, *, prediction_type: str = "epsilon", overwrite: bool = False
) -> Path:
    """Write a tiny SD 1.x-style `StableDiffusionPipeline` (v-prediction gives an SD 2.x-style one)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
    with _atomic_dir(out_dir, overwrite) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _clip_tokenizer()
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, 32, "quick_gelu"))
        unet = UNet2DConditionModel(
            sample_size=_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            # Attention at the high-resolution level, none at the lowest, as in SD 1.5.
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=2,  # diffusers quirk: this is the number of heads
            cross_attention_dim=text_encoder.config.hidden_size,
        )
        scheduler = PNDMScheduler(
            **_SD_BETAS,
            prediction_type=prediction_type,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(0.18215),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
    return Path(out_dir)


def build_tiny_sdxl(
    out_dir: str | Path, seed: int = 0, *, prediction_type: str = "epsilon", overwrite: bool = False
) -> Path:
    """Write a tiny `StableDiffusionXLPipeline` with two text encoders of different widths."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
    time_embed_dim = 8  # SDXL: 256
    with _atomic_dir(out_dir, overwrite) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _clip_tokenizer()
        tokenizer_2 = _clip_tokenizer(pad_token="!")  # as SDXL's second tokenizer
        # Different widths (SDXL: 768 and 1280) so code that mixes the encoders up fails loudly.
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, 32, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, 64, "gelu"))
        unet = UNet2DConditionModel(
            sample_size=_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            # No attention at the high-resolution level, as in SDXL.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),  # number of heads per level
            use_linear_projection=True,
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 micro-conditioning numbers (original size, crop, target size) + pooled text embedding.
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        )
        scheduler = EulerDiscreteScheduler(
            **_SD_BETAS,
            prediction_type=prediction_type,
            interpolation_type="linear",
            timestep_spacing="leading",
            steps_offset=1,
        )
        pipe = StableDiffusionXLPipeline(
            vae=_vae(0.13025),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        pipe.save_pretrained(tmp)
    return Path(out_dir)


def build_tiny_sd3(out_dir: str | Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a tiny `StableDiffusion3Pipeline`: two CLIP encoders with projection, a T5 encoder, an
    MM-DiT `SD3Transformer2DModel` and a 16-channel VAE with SD3's shift and scaling factors."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    with _atomic_dir(out_dir, overwrite) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(pad_token="!"), _t5_tokenizer()
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, 32, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, 32, "gelu"))
        # The pipeline pads the two CLIP embeddings (32 + 32) to T5's width: SD3's 768 + 1280 -> 4096.
        text_encoder_3 = _t5_encoder(tokenizer_3, 64)
        transformer = SD3Transformer2DModel(
            sample_size=_LATENT_SIZE,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_3.config.d_model,
            caption_projection_dim=16,  # heads * head width, as SD3's 1536
            pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
            pos_embed_max_size=16,
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=_vae(1.5305, latent_channels=16, shift_factor=0.0609),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        pipe.save_pretrained(tmp)
    return Path(out_dir)


def build_tiny_flux(out_dir: str | Path, seed: int = 0, *, guidance_embeds: bool = True,
                    overwrite: bool = False) -> Path:
    """Write a tiny `FluxPipeline`: CLIP + T5 encoders, a `FluxTransformer2DModel` (double- and
    single-stream blocks, packed 2x2 latents) with FLUX.1-dev's guidance embedding (``guidance_embeds``
    False gives a schnell-style one) and a 16-channel VAE with FLUX's shift and scaling factors."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    with _atomic_dir(out_dir, overwrite) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, 32, "quick_gelu"))
        text_encoder_2 = _t5_encoder(tokenizer_2, 64)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,  # CLIP's pooled output
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),  # sums to the head width, as FLUX's (16, 56, 56)
        )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        pipe = FluxPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=_vae(0.3611, latent_channels=16, shift_factor=0.1159),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        pipe.save_pretrained(tmp)
    return Path(out_dir)


def build_tiny_clip(out_dir: str | Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a tiny ViT-B/32-shaped `CLIPModel` and its `CLIPProcessor` (openai preprocessing)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    with _atomic_dir(out_dir, overwrite) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _clip_tokenizer()
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
            projection_dim=32,
        )
        text = _clip_text_config(tokenizer, 32, "quick_gelu")
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
        CLIPModel(config).save_pretrained(tmp)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 224},
            crop_size={"height": 224, "width": 224},
            resample=3,  # bicubic
            do_center_crop=True,
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        )
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
    return Path(out_dir)


def build_tiny_dino(out_dir: str | Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a tiny DINO-style `ViTModel` (patch 16, no pooler) and its `ViTImageProcessor`."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    with _atomic_dir(out_dir, overwrite) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=16,
        )
        ViTModel(config, add_pooling_layer=False).save_pretrained(tmp)
        ViTImageProcessor(
            size={"height": 224, "width": 224},
            resample=3,  # bicubic
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ).save_pretrained(tmp)
    return Path(out_dir)


def _llama_tokenizer():
    """Byte-level tokenizer without merges: every byte is a token, so any text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = _LLAMA_SPECIALS
    tokens = [*_LLAMA_SPECIALS, *_byte_chars()]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=_LLAMA_CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_tiny_llama(out_dir: str | Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a tiny `LlamaForCausalLM` (grouped-query attention) with a byte-level fast tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with _atomic_dir(out_dir, overwrite) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _llama_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


BUILDERS: dict[str, Callable[..., Path]] = {
    "sd": build_tiny_sd,
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
    "clip": build_tiny_clip,
    "dino": build_tiny_dino,
    "llama": build_tiny_llama,
}


def build_tiny(kind: str, out_dir: str | Path, seed: int = 0, **options) -> Path:
    """Write the tiny model `kind` (one of `KINDS`) to `out_dir` and return its path.

    `options` go to the kind's builder: `overwrite` for all, `prediction_type` for `sd`/`sdxl`.
    """
    if kind not in BUILDERS:
        raise ValueError(f"Unknown tiny model kind `{kind}`; choose one of {', '.join(KINDS)}.")
    return BUILDERS[kind](out_dir, seed, **options)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: `python -m flatlora_diffusion.tiny KIND OUT_DIR`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--prediction_type", choices=PREDICTION_TYPES, help="scheduler prediction type (sd/sdxl only)"
    )
    args = parser.parse_args(argv)
    options: dict[str, object] = {"overwrite": args.overwrite}
    if args.prediction_type is not None:
        if args.kind not in ("sd", "sdxl"):
            parser.error(f"`--prediction_type` applies to `sd` and `sdxl` only, not `{args.kind}`.")
        options["prediction_type"] = args.prediction_type
    try:
        path = build_tiny(args.kind, args.out_dir, args.seed, **options)
    except FileExistsError as err:
        parser.exit(1, f"error: {err}\n")
    print(f"Wrote tiny {args.kind} model to {path}")


if __name__ == "__main__":
    main()
