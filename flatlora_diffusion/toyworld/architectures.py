"""The toy models' architectures: stock diffusers/transformers classes at small sizes.

Every model is a standard class (`AutoencoderKL`, `UNet2DConditionModel`, `CLIPModel`,
`ViTModel`) so that the pretrained toy world loads through the same `from_pretrained` calls as
Stable Diffusion 1.5, OpenAI CLIP and DINO.

* VAE: 64x64 RGB <-> 8x8x8 latents (8x downsampling like SD's VAE; 8 channels because 4 cannot
  hold the patterns at this size).
* UNet: SD-style, levels 32/64/128 channels, cross-attention at the two lower levels, conditioned
  on the CLIP text encoder's last hidden state (64 wide), v-prediction.
* CLIP: ViT-style image tower (patch 8 on 64 px) and text tower, 3 layers each, 64 wide.
* ViT (the DINO stand-in): 4 layers, 64 wide, patch 8, no pooler.
"""

from __future__ import annotations

from flatlora_diffusion.toyworld.world import IMAGE_SIZE

LATENT_CHANNELS = 8
LATENT_SIZE = IMAGE_SIZE // 8
TEXT_WIDTH = 64
# SD 1.x/2.x's beta schedule; v-prediction as SD 2.x (it trains far better than epsilon at this size).
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_vae():
    """A 4-level `AutoencoderKL` (64 px -> 8x8x8); `scaling_factor` is set after training."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64),
                         layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
                         sample_size=IMAGE_SIZE)


def build_unet():
    """The SD-style text-to-image UNet on 8x8x8 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1,
        attention_head_dim=(2, 4, 8),  # diffusers quirk: the number of heads per level (width 16 each)
        cross_attention_dim=TEXT_WIDTH,
    )


def build_clip(tokenizer):
    """A small `CLIPModel` whose text tower is sized to the world's tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": len(tokenizer), "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH,
            "num_hidden_layers": 3, "num_attention_heads": 2, "max_position_embeddings": tokenizer.model_max_length,
            "projection_dim": 64, "hidden_act": "quick_gelu", "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": 8, "projection_dim": 64, "hidden_act": "quick_gelu"}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def clip_processor(tokenizer):
    """The CLIP processor: bicubic resize and centre crop to 64 px, OpenAI's mean/std."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                resample=3, do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def build_vit():
    """The DINO stand-in: a `ViTModel` without pooler (features: the CLS token after the last LayerNorm)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                       image_size=IMAGE_SIZE, patch_size=8)
    return ViTModel(config, add_pooling_layer=False)


def vit_processor():
    """The ViT processor: 64x64 bicubic resize, ImageNet mean/std."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def sd_scheduler():
    """The sampling scheduler shipped with the pipeline: DDIM, v-prediction, trailing timesteps."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**BETAS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="trailing")
