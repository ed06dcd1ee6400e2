"""DreamBooth on the transformer families (SD3/3.5, FLUX.1) through the one trainer, on tiny models.

A few steps of LoRA and Flat-LoRA with prior preservation and CLIP text-encoder training; kill and
resume equals an uninterrupted run; the adapter loads into the stock pipeline and changes its
output; the kohya-style FLUX file loads through diffusers' own loader and gives the same images;
the flow-matching loss equals one computed independently with diffusers' pipelines and
`training_utils` as its SD3/FLUX scripts do; every bad input gets its error before training.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import Killed, kill_while_writing_checkpoint
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from flatlora_diffusion.dreambooth import checkpoints as ckpt
from flatlora_diffusion.dreambooth.config import ConfigError, load_config
from flatlora_diffusion.dreambooth.data import demo_subject_dir
from flatlora_diffusion.dreambooth.trainer import DreamBoothError, DreamBoothTrainer

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks dog"
FAMILIES = ("sd3", "flux")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own `Accelerator`; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def model(request, tiny_sd3_path, tiny_flux_path) -> Path:
    """The tiny pipeline of the family named by the test's `family` parameter."""
    return {"sd3": tiny_sd3_path, "flux": tiny_flux_path}[request.getfixturevalue("family")]


def argv(model: Path | str, out: Path, *extra: str, steps: int = 2, seed: int = 0) -> list[str]:
    """32 px, batch 2, a few steps, no tracker, no validation."""
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(demo_subject_dir()),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--report_to", "none",
            "--checkpointing_steps", "1000", "--seed", str(seed), *extra]


def prior_flags(out: Path) -> list[str]:
    return ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", str(out / "class"),
            "--num_class_images", "2", "--class_num_inference_steps", "2"]


def train(args: list[str]) -> DreamBoothTrainer:
    from flatlora_diffusion.dreambooth.trainer import run

    return run(load_config(args))


def stock_pipeline(model: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


# ---------------------------------------------------------------------------------------------
# Training runs


@pytest.mark.parametrize("family", FAMILIES)
def test_flat_lora_with_prior_preservation_and_text_encoders(family, model, tmp_path):
    out = tmp_path / "out"
    args = argv(model, out, "--rho", "0.1", "--flat_schedule", "constant", "--train_text_encoder",
                *prior_flags(tmp_path), steps=3)
    trainer = DreamBoothTrainer(load_config(args))
    try:
        trainer.setup()
        # The CLIP encoders train; T5 never does, as in diffusers.
        clip = {"sd3": {"text_encoder", "text_encoder_2"}, "flux": {"text_encoder"}}[family]
        assert set(trainer.trained) == {"transformer", *clip}
        # Flat-LoRA perturbs every trained LoRA layer: the joint attention's text-stream projections too.
        for name, model_ in trainer.trained.items():
            lora_layers = {n for n, m in model_.named_modules() if isinstance(m, LoraLayer)}
            assert len(trainer.perturbers[name].layers) == len(lora_layers) > 0
        trainer.train()
        trainer.save()
    finally:
        trainer.cleanup()
    assert len(trainer.losses) == 3 and all(torch.isfinite(torch.tensor(trainer.losses)))
    trained_names = {n for n, m in trainer.components.denoiser.named_modules() if isinstance(m, LoraLayer)}
    assert {n.rsplit(".", 1)[-1] for n in trained_names} >= {"to_q", "add_q_proj", "to_add_out"}
    tensors = load_file(str(out / "pytorch_lora_weights.safetensors"))
    prefixes = {key.split(".")[0] for key in tensors}
    assert prefixes == {"transformer", *clip}
    assert any(".attn.add_k_proj.lora_A." in key for key in tensors)  # peft names, as diffusers' DiT scripts
    info = json.loads((out / "adapter_info.json").read_text())
    assert info["model_type"] == family and info["flat_lora"]["rho"] == 0.1
    assert info["training"]["with_prior_preservation"] and len(list((tmp_path / "class").glob("*.png"))) == 2
    resolved = load_config(["--config", str(out / "config.yaml")]).to_flags()
    assert resolved["weighting_scheme"] == {"sd3": "logit_normal", "flux": "none"}[family]
    assert resolved["guidance_scale"] == ({"flux": 3.5}.get(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_loads_into_the_stock_pipeline_and_changes_its_output(family, model, tmp_path):
    out = tmp_path / "out"
    train(argv(model, out, "--rho", "0.05", "--learning_rate", "1e-2", steps=2))
    pipe = stock_pipeline(model)
    before = sample(pipe)
    pipe.load_lora_weights(str(out))  # the stock loader, no flatlora_diffusion code
    after = sample(pipe)
    assert (after - before).abs().max() > 1e-4
    assert "default_0" in {n for names in pipe.get_list_adapters().values() for n in names}


def test_flux_kohya_file_loads_through_diffusers_and_gives_the_same_images(tiny_flux_path, tmp_path):
    out = tmp_path / "out"
    train(argv(tiny_flux_path, out, "--output_kohya_format", "--train_text_encoder", "--lora_alpha", "8",
               "--learning_rate", "1e-2", steps=2))
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert {key.split("_")[1] for key in kohya} == {"transformer", "te1"}
    images = {}
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = stock_pipeline(tiny_flux_path)
        pipe.load_lora_weights(str(out), weight_name=weight_name)
        images[weight_name] = sample(pipe)
    torch.testing.assert_close(*images.values(), atol=1e-5, rtol=0)


def test_sd3_has_no_kohya_format(tiny_sd3_path, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DreamBoothError, match="diffusers has no kohya converter for SD3"):  # before training
        train(argv(tiny_sd3_path, out, "--output_kohya_format", steps=1))
    assert not any(out.rglob("*.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_kill_and_resume_equals_an_uninterrupted_run(family, model, tmp_path, monkeypatch):
    extra = ("--rho", "0.1", "--train_text_encoder", "--cache_latents", "--checkpointing_steps", "1")
    train(argv(model, tmp_path / "ref", *extra, steps=4))
    kill_while_writing_checkpoint(monkeypatch, 3)
    with pytest.raises(Killed):
        train(argv(model, tmp_path / "cut", *extra, steps=4))
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut")] == ["checkpoint-1", "checkpoint-2"]
    train(argv(model, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest", steps=4))
    reference = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=0, rtol=0)


def test_bf16_with_gradient_checkpointing_keeps_lora_in_fp32(tiny_flux_path, tmp_path):
    trainer = train(argv(tiny_flux_path, tmp_path / "out", "--mixed_precision", "bf16", "--gradient_checkpointing",
                         "--rho", "0.1", steps=1))
    transformer = trainer.components.denoiser
    assert transformer.is_gradient_checkpointing
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(trainer.losses)))


def test_lora_blocks_and_layers_choose_the_targets(tiny_sd3_path, tmp_path):
    trainer = train(argv(tiny_sd3_path, tmp_path / "out", "--lora_layers", "attn.to_q,attn.add_q_proj",
                         "--lora_blocks", "1", steps=1))
    names = {n for n, m in trainer.components.denoiser.named_modules() if isinstance(m, LoraLayer)}
    assert names == {"transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.add_q_proj"}
    assert trainer.config.lora.lora_target_modules == ["attn.to_q", "attn.add_q_proj"]


def test_two_process_accelerate_launch_on_cpu(tiny_flux_path, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/cpu.yaml"), "--main_process_port",
           str(port), str(REPO / "train_dreambooth_flatlora.py"),
           *argv(tiny_flux_path, out, "--rho", "0.1", "--train_batch_size", "1", "--checkpointing_steps", "1")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "checkpoint-1" / ckpt.STATE_NAME).read_text())["num_processes"] == 2
    assert json.loads((out / "adapter_info.json").read_text())["training"]["num_processes"] == 2


# ---------------------------------------------------------------------------------------------
# The flow-matching loss against diffusers' own computation


def _reference_loss(trainer: DreamBoothTrainer, batch: dict, family: str) -> torch.Tensor:
    """The loss of `batch` as diffusers' `train_dreambooth_lora_sd3.py` / `_flux.py` compute it: prompts
    through the stock pipeline's `encode_prompt`, timesteps from `compute_density_for_timestep_sampling`,
    σ looked up by timestep (the scripts' `get_sigmas`), FLUX's latents packed by the pipeline's helpers."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from flatlora_diffusion.dreambooth.objectives import sample_noise
    from flatlora_diffusion.flat_lora import mix_seed

    cfg, c = trainer.config, trainer.components
    pipe = stock_pipeline(Path(c.path))
    gen = torch.Generator().manual_seed(mix_seed(trainer.seed, 0, 0, 0))
    model_input = trainer._latents(batch, gen)  # the VAE posterior sample: not what is checked here
    noise = sample_noise(model_input, 0.0, gen)
    bsz = model_input.shape[0]
    u = compute_density_for_timestep_sampling(cfg.optim.weighting_scheme, bsz, logit_mean=cfg.optim.logit_mean,
                                              logit_std=cfg.optim.logit_std, mode_scale=cfg.optim.mode_scale,
                                              generator=gen)
    scheduler = c.noise_scheduler
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    transformer = c.denoiser
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(batch["prompts"], batch["prompts"], batch["prompts"],
                                                      do_classifier_free_guidance=False, max_sequence_length=77)
            pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
            pred = pred * (-sigmas) + noisy  # --precondition_outputs (the SD3 script's default)
            target = model_input
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(batch["prompts"], batch["prompts"], max_sequence_length=512)
            b, ch, h, w = noisy.shape
            packed = pipe._pack_latents(noisy, b, ch, h, w)
            image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
            guidance = torch.tensor([cfg.model.guidance_scale]).expand(b)
            pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                               img_ids=image_ids, return_dict=False)[0]
            pred = pipe._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)
            target = noise - model_input
    weighting = compute_loss_weighting_for_sd3(cfg.optim.weighting_scheme, sigmas)
    per_sample = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)
    is_class = batch["is_class"]
    return per_sample[~is_class].mean() + cfg.data.prior_loss_weight * per_sample[is_class].mean()


@pytest.mark.parametrize(("family", "scheme"), [("sd3", "logit_normal"), ("flux", "none"), ("flux", "mode"),
                                               ("sd3", "cosmap")])
def test_flow_matching_loss_equals_diffusers_computation(family, scheme, model, tmp_path):
    args = argv(model, tmp_path / "out", "--weighting_scheme", scheme, "--train_batch_size", "4",
                *prior_flags(tmp_path))
    trainer = DreamBoothTrainer(load_config(args))
    try:
        trainer.setup()
        batch = next(b for b in trainer.dataloader if b["is_class"].any() and not b["is_class"].all())
        with torch.no_grad():
            ours = trainer._loss(batch, 0)
        torch.testing.assert_close(ours, _reference_loss(trainer, batch, family), rtol=1e-5, atol=1e-6)
    finally:
        trainer.cleanup()


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(("family", "extra", "match"), [
    ("sd3", ["--snr_gamma", "5"], r"`--snr_gamma` does not apply .* flow-matching models weight the loss"),
    ("sd3", ["--guidance_scale", "3.5"], r"`--guidance_scale`: the transformer of .* has no guidance embedding"),
    ("flux", ["--prediction_type", "v_prediction"], r"`--prediction_type` does not apply"),
    ("flux", ["--precondition_outputs"], r"`--precondition_outputs` is SD3's"),
    ("sd3", ["--resolution", "40"], r"`--resolution` must be a multiple of 16 for SD3"),
    ("sd3", ["--lora_blocks", "7"], r"`--lora_blocks` 7: .* has 2 transformer blocks \(0-1\)"),
])
def test_family_bad_input_errors_before_training(family, extra, match, model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DreamBoothError, match=match):
        train(argv(model, out, *extra))
    assert not any(out.rglob("*.safetensors"))


def test_flux_without_guidance_embedding_trains_and_refuses_guidance_scale(tmp_path):
    trainer = train(argv("tiny:flux-schnell", tmp_path / "out", steps=1))  # a schnell-style transformer
    assert trainer.config.model.guidance_scale is None and all(torch.isfinite(torch.tensor(trainer.losses)))
    with pytest.raises(DreamBoothError, match=r"`--guidance_scale`: the transformer of `tiny:flux-schnell`"):
        train(argv("tiny:flux-schnell", tmp_path / "again", "--guidance_scale", "3.5", steps=1))


def test_flow_matching_flags_on_sd_are_refused(tiny_sd_path, tmp_path):
    with pytest.raises(DreamBoothError, match=r"`--weighting_scheme` applies to SD3 and FLUX .* drop it"):
        train(argv(tiny_sd_path, tmp_path / "out", "--weighting_scheme", "logit_normal", "--resolution", "32"))


def test_unknown_weighting_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match=r"weighting_scheme"):
        load_config(["--pretrained_model_name_or_path", "tiny:flux", "--instance_data_dir", "imgs", "--instance_prompt",
                     PROMPT, "--weighting_scheme", "uniformish"])


def test_fp16_with_flux_is_refused_with_the_reason():
    from dataclasses import replace

    from flatlora_diffusion.dreambooth.config import MemoryConfig

    config = load_config(["--pretrained_model_name_or_path", "tiny:flux", "--instance_data_dir", "imgs",
                          "--instance_prompt", PROMPT])
    # `from_flags` refuses fp16 on a machine without CUDA first; the FLUX rule is checked on its own here.
    config = replace(config, memory=MemoryConfig(mixed_precision="fp16"))
    errors = config.family_errors("flux", guidance_embeds=True, model="tiny:flux")
    assert any("FLUX.1 is trained in bf16" in e and "`--mixed_precision bf16`" in e for e in errors)
    assert not replace(config, memory=MemoryConfig(mixed_precision="bf16")).family_errors("flux", guidance_embeds=True)


@pytest.mark.parametrize(("trained", "loaded"), [("flux", "sd3"), ("sd3", "flux"), ("flux", "sd")])
def test_cross_family_adapter_is_refused(trained, loaded, tmp_path, tiny_sd3_path, tiny_flux_path, tiny_sd_path):
    from flatlora_diffusion.adapters import AdapterError, load_adapter

    paths = {"sd3": tiny_sd3_path, "flux": tiny_flux_path, "sd": tiny_sd_path}
    out = tmp_path / "adapter"
    train(argv(paths[trained], out, steps=1))
    pipe = stock_pipeline(paths[loaded])
    name = {"sd3": "SD3", "flux": "FLUX", "sd": "SD 1.x/2.x"}
    with pytest.raises(AdapterError, match=rf"trained for {name[trained]} .* the pipeline is {name[loaded]}"):
        load_adapter(pipe, out, "dog")
    assert not pipe.get_list_adapters() or not any(pipe.get_list_adapters().values())


def test_resuming_another_familys_checkpoint_is_refused(tiny_sd3_path, tiny_flux_path, tmp_path):
    out = tmp_path / "out"
    train(argv(tiny_flux_path, out, "--checkpointing_steps", "1", steps=1))
    with pytest.raises(DreamBoothError, match=r"checkpoint-1"):
        train(argv(tiny_sd3_path, out, "--resume_from_checkpoint", "latest", steps=2))
