"""The Flat-LoRA core on the factory's tiny models, loaded as a user's real checkpoint would be."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flatlora_diffusion.flat_lora import FlatLoraConfig, FlatLoraPerturber

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def load_unet(path, dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    unet.requires_grad_(False)
    torch.manual_seed(0)  # the LoRA init
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet.train()


def unet_loss(unet, seed: int = 0) -> torch.Tensor:
    cfg = unet.config
    gen = torch.Generator().manual_seed(seed)
    dtype = unet.dtype
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text_dim, generator=gen).to(dtype),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2).to(dtype),
        }
    sample = torch.randn(2, cfg.in_channels, 8, 8, generator=gen).to(dtype)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(dtype)
    out = unet(sample, torch.tensor([10, 500]), context, **kwargs).sample
    return out.float().square().mean()


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model, loss_fn, steps: int, config: FlatLoraConfig) -> FlatLoraPerturber:
    perturber = FlatLoraPerturber(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        perturber.set_step(step)
        loss = loss_fn(model, step)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return perturber


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sd_unet_base_bit_identical_after_training(tiny_sd_path, dtype):
    unet = load_unet(tiny_sd_path, dtype)
    before = frozen(unet)
    perturber = train(unet, unet_loss, steps=4, config=FlatLoraConfig(rho=0.1, total_steps=4))
    assert len(perturber.layers) == sum(1 for n, _ in unet.named_modules() if n.endswith(tuple(UNET_TARGETS)))
    assert perturber.factor > 0
    assert all(torch.equal(before[n], p) for n, p in frozen(unet).items())


def test_sdxl_unet_trains_under_noise(tiny_sdxl_path):
    unet = load_unet(tiny_sdxl_path)
    before = frozen(unet)
    unet.eval()
    with torch.no_grad():
        clean = unet_loss(unet)
    unet.train()
    perturber = FlatLoraPerturber(unet, FlatLoraConfig(rho=0.5, schedule="constant"))
    perturber.set_step(0)
    with torch.no_grad():
        noisy = unet_loss(unet)
    assert noisy != clean  # the noise reaches the output
    perturber.remove()
    train(unet, unet_loss, steps=2, config=FlatLoraConfig(rho=0.1, schedule="constant"))
    assert all(torch.equal(before[n], p) for n, p in frozen(unet).items())


def test_gradient_checkpointing_sees_the_same_noise(tiny_sd_path):
    grads = []
    for checkpointing in (False, True):
        unet = load_unet(tiny_sd_path)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        perturber = FlatLoraPerturber(unet, FlatLoraConfig(rho=0.3, schedule="constant"))
        perturber.set_step(1)
        unet_loss(unet).backward()
        grads.append(lora_grads(unet))
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-5, atol=1e-7)


def test_clip_text_encoder(tiny_sd_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").requires_grad_(False)
    model = get_peft_model(encoder, LoraConfig(r=4, init_lora_weights="gaussian", target_modules=TEXT_TARGETS))
    model.train()
    ids = tokenizer(["a photo of sks dog"], padding="max_length", truncation=True, return_tensors="pt").input_ids
    before = frozen(model)

    def loss_fn(m, step):
        return m(input_ids=ids).last_hidden_state.square().mean()

    perturber = train(model, loss_fn, steps=3, config=FlatLoraConfig(rho=0.1, total_steps=3))
    assert len(perturber.layers) == 4 * encoder.config.num_hidden_layers
    assert all(torch.equal(before[n], p) for n, p in frozen(model).items())


def test_llama_in_bf16(tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    batch = tokenizer(["Q: 2 + 3?\nA: 5\n#### 5"], return_tensors="pt")
    before = frozen(model)

    def loss_fn(m, step):
        return m(**batch, labels=batch["input_ids"]).loss

    perturber = train(model, loss_fn, steps=3, config=FlatLoraConfig(rho=0.05, total_steps=3))
    names = {name.rsplit(".", 1)[-1] for name, _, _ in perturber.layers}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(torch.equal(before[n], p) for n, p in frozen(model).items())


def test_transformers_trainer_integration(tiny_llama_path, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from flatlora_diffusion.integrations.transformers import add_flat_lora

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_path),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    texts = [f"Q: {a} + {b}?\nA: {a + b}" for a in range(6) for b in range(2)]
    data = Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=24)))
    data = data.map(lambda row: {"labels": row["input_ids"]})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=4, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback = add_flat_lora(trainer, FlatLoraConfig(rho=0.05))
    before = frozen(model)
    seen_steps = []
    original = FlatLoraPerturber.set_step

    def spy(self, step):
        seen_steps.append(step)
        original(self, step)

    FlatLoraPerturber.set_step = spy
    try:
        trainer.train()
    finally:
        FlatLoraPerturber.set_step = original
    assert seen_steps == [0, 1, 2, 3]  # one call per optimiser step, not per micro-batch
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("flat_lora/rho_t" in entry for entry in logged)
    assert logged[-1]["flat_lora/rho_t"] == pytest.approx(0.05 * 0.5 * (1 - torch.cos(torch.tensor(torch.pi * 3 / 4))).item())
    assert callback.perturber is None  # removed at train end
    assert all(torch.equal(before[n], p) for n, p in frozen(model).items())


def test_accelerate_integration_uses_process_index(tiny_sd_path):
    from accelerate import Accelerator

    from flatlora_diffusion.integrations.accelerate import prepare_flat_lora

    accelerator = Accelerator(cpu=True)
    unet = accelerator.prepare(load_unet(tiny_sd_path))
    perturber = prepare_flat_lora(accelerator, unet, FlatLoraConfig(rho=0.1, schedule="constant"))
    assert perturber.rank == accelerator.process_index
    perturber.set_step(1)
    unet_loss(accelerator.unwrap_model(unet)).backward()


def test_transformers_trainer_resume_inside_an_interval_is_exact(tiny_llama_path, tmp_path):
    """Checkpoint 4 falls inside the draw of steps 3-5 (`interval=3`): the resumed run keeps its σ."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from flatlora_diffusion.integrations.transformers import add_flat_lora

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    texts = [f"Q: {a} + {b}?\nA: {a + b}" for a in range(6) for b in range(2)]
    data = Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=24)))
    data = data.map(lambda row: {"labels": row["input_ids"]})

    def run(out, resume=None):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_path),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, save_steps=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, logging_steps=100)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        add_flat_lora(trainer, FlatLoraConfig(rho=0.5, schedule="constant", interval=3))
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = run(tmp_path / "ref")
    resumed = run(tmp_path / "ref", resume=str(tmp_path / "ref" / "checkpoint-4"))
    assert max((reference[k] - resumed[k]).abs().max().item() for k in reference) == 0
