"""The flatness meter: its plain loss is the trainer's, its noise is the trainer's, its expected loss
matches the closed form of a linear layer, its directions are shared by all adapters, and bad input
is refused before any measurement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import add_random_lora, save_random_adapter
from peft import LoraConfig, get_peft_model
from torch import nn

from flatlora_diffusion.dreambooth.data import demo_subject_dir
from flatlora_diffusion.dreambooth.models import tokenize
from flatlora_diffusion.dreambooth.objectives import diffusion_loss, dreambooth_loss
from flatlora_diffusion.flat_lora import FlatLoraConfig, FlatLoraPerturber
from flatlora_diffusion.flatness import FlatnessConfig, FlatnessError, measure_flatness, open_world
from flatlora_diffusion.flatness.__main__ import main
from flatlora_diffusion.flatness.meter import (
    direction,
    direction_curves,
    expected_losses,
    merged_row_norms,
    paper_noise,
    target_layers,
)

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = {"samples": 4, "batch_size": 4, "draws": 2, "directions": 1, "alpha_points": 3, "resolution": 32}


@pytest.fixture(scope="module")
def other_adapter_dir(tiny_sd_path, tmp_path_factory) -> Path:
    """A second random SD LoRA (UNet + text encoder) on the same tiny base."""
    return save_random_adapter(tiny_sd_path, tmp_path_factory.mktemp("adapters") / "sd_other", seed=1)


def sd_config(base, adapters: dict, out=None, **settings) -> FlatnessConfig:
    """Paths may be given as `Path`s (the settings are stored as text)."""
    return FlatnessConfig(base=base, adapters=adapters, data=demo_subject_dir(), out=out, **(FAST | settings))


def linear_lora(n: int = 512, m: int = 32, seed: int = 0) -> nn.Module:
    """One peft LoRA linear (rank 4) whose LoRA delta is large: ‖W'_i‖ differs from ‖W_i‖ by tens of percent."""
    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(nn.Linear(n, m)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    return model.eval()


def probe_noise(layer) -> torch.Tensor:
    """ε of a LoRA layer, read through its base layer's forward on the identity (as in test_flat_lora)."""
    base = layer.get_base_layer()
    with torch.no_grad():
        out = base(torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device))
    bias = base.bias if base.bias is not None else 0
    return (out - bias).T.double() - base.weight.double()


def row_sigma(layer, adapter: str, radius: float) -> torch.Tensor:
    """σ_i = r·‖W'_i‖/√n from the materialised merged weight, shape (m,)."""
    merged = layer.get_base_layer().weight.double() + layer.get_delta_weight(adapter).double()
    return radius * merged.norm(dim=1) / math.sqrt(merged.shape[1])


# ---------------------------------------------------------------------------------------------
# The plain loss is the trainer's


def test_plain_loss_is_the_trainers_loss_on_the_same_triples(tiny_sd_path, sd_adapter_dir):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    world = open_world(sd_config(tiny_sd_path, {"dog": sd_adapter_dir}))
    try:
        world.activate("dog")
        clean = world.loss()
    finally:
        world.close()
    # Independently: a stock pipeline with the adapter loaded by diffusers, the trainer's loss function.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(str(sd_adapter_dir))
    scheduler = DDPMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    with torch.no_grad():
        noisy = scheduler.add_noise(world.latents, world.noise, world.timesteps)
        embeds = pipe.text_encoder(tokenize(pipe.tokenizer, world.prompts)).last_hidden_state
        pred = pipe.unet(noisy, world.timesteps, embeds).sample
    is_class = torch.zeros(len(world.prompts), dtype=torch.bool)
    trainer_loss = dreambooth_loss(pred, world.noise, world.timesteps, is_class, scheduler, None, 1.0)
    assert clean == trainer_loss.item(), (clean, trainer_loss.item())
    # The held-out set is the trainer's: a fixed prompt, timesteps in the training range, epsilon targets.
    assert world.prompts == ["a photo of sks dog"] * 4  # from the adapter's recorded instance prompt
    assert torch.equal(world.target, world.noise)


def test_radius_zero_is_the_plain_loss_exactly_and_draws_differ(tiny_sd_path, sd_adapter_dir, tmp_path):
    report = measure_flatness(sd_config(tiny_sd_path, {"dog": sd_adapter_dir}, out=tmp_path, radii=(0, 0.5),
                                        draws=3), progress=False)
    assert json.loads((tmp_path / "flatness.json").read_text()) == report  # written as returned
    result = report["adapters"]["dog"]
    assert result["expected"]["0"]["mean"] == result["loss"] and result["expected"]["0"]["sem"] == 0
    noisy = result["expected"]["0.5"]
    assert len(noisy["draws"]) == 3 and len(set(noisy["draws"])) == 3  # three different draws
    assert noisy["sharpness"] == pytest.approx(noisy["mean"] - result["loss"])
    assert noisy["mean"] == pytest.approx(sum(noisy["draws"]) / 3)


# ---------------------------------------------------------------------------------------------
# The noise is the trainer's


def test_noise_is_the_trainers_perturber_with_per_row_sigma():
    model = linear_lora(n=1024, m=64)
    layers = target_layers({"net": model}, "default")
    (layer,) = layers.values()
    sigma = row_sigma(layer, "default", 0.2)
    draws = []
    with paper_noise(layers, 0.2, seed=3) as perturber:
        for k in range(4):
            perturber.set_step(k)
            draws.append(probe_noise(layer))
    eps = torch.stack(draws)  # (draws, m, n)
    n = eps.shape[-1]
    row_std = eps.std(dim=-1) / sigma  # (draws, m): s.e. of one row's std ≈ 1/√(2n) = 2.2%
    assert abs(row_std.mean().item() - 1) < 0.01
    assert (row_std - 1).abs().max() < 0.15
    assert ((eps.mean(dim=-1) / sigma).abs() < 5 / math.sqrt(n)).all()
    assert not torch.equal(eps[0], eps[1])
    assert not layer.get_base_layer().training and "forward" not in layer.get_base_layer().__dict__  # removed
    # The trainer's perturber on the same model, seed and step draws exactly this noise (no second sampler).
    trainer_side = FlatLoraPerturber(model, FlatLoraConfig(rho=0.2, schedule="constant", seed=3, sampler="gaussian"))
    model.train()
    trainer_side.set_step(2)
    assert torch.equal(probe_noise(layer), eps[2])
    trainer_side.remove()


def test_noise_on_every_target_layer_of_a_pipeline_has_sigma_from_the_merged_rows(tiny_sd_path):
    from flatlora_diffusion.sampling import load_pipeline

    pipe = load_pipeline(tiny_sd_path)
    add_random_lora(pipe)
    layers = target_layers({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "default")
    assert any(name.startswith("text_encoder.") for name in layers) and len(layers) > 8
    standardised = []
    with paper_noise(layers, 0.1, seed=0) as perturber:
        for k in range(3):
            perturber.set_step(k)
            standardised += [(probe_noise(layer) / row_sigma(layer, "default", 0.1)[:, None]).flatten()
                             for layer in layers.values()]
    z = torch.cat(standardised)  # every element of every layer: N(0, 1) if σ_i is right
    assert abs(z.std().item() - 1) < 0.01 and abs(z.mean().item()) < 5 / math.sqrt(z.numel())


# ---------------------------------------------------------------------------------------------
# The closed form of a linear layer under squared error


def test_expected_loss_of_a_linear_layer_matches_the_closed_form():
    """L(W) = mean over the N×m outputs of (XWᵀ + b − Y)²; then E L(W + ε) − L(W) = Σ_i σ_i²·‖X‖_F² / (N·m)."""
    model = linear_lora(n=256, m=16)
    layers = target_layers({"net": model}, "default")
    (layer,) = layers.values()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 256, generator=gen)
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(32, 16, generator=gen)

    def loss() -> float:
        with torch.no_grad():
            return diffusion_loss(model(x), y, None, None, None).mean().item()  # the trainer's MSE

    clean = loss()
    radius = 0.1
    result = expected_losses(loss, layers, [radius], 400, seed=0, sampler="gaussian", clean=clean)["0.1"]
    sigma = row_sigma(layer, "default", radius)
    closed_form = (sigma.square().sum() * x.double().square().sum() / y.numel()).item()
    assert abs(result["sharpness"] - closed_form) < 4 * result["sem"]
    assert result["sem"] < 0.02 * closed_form  # precise enough to tell σ from W' apart from σ from W:
    base_only = (radius * layer.get_base_layer().weight.double().norm(dim=1) / math.sqrt(256)).square().sum()
    assert abs(base_only.item() * x.double().square().sum().item() / y.numel() - closed_form) > 0.1 * closed_form


# ---------------------------------------------------------------------------------------------
# Directions, adapters on one base


def test_directions_and_noise_draws_are_the_same_for_every_adapter(tiny_sd_path, sd_adapter_dir, other_adapter_dir):
    from flatlora_diffusion.adapters import load_adapter
    from flatlora_diffusion.sampling import activate_adapters, load_pipeline

    pipe = load_pipeline(tiny_sd_path)
    load_adapter(pipe, sd_adapter_dir, "a")
    load_adapter(pipe, other_adapter_dir, "b")
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    unit, standard = {}, {}
    for name in ("a", "b"):
        activate_adapters(pipe, {name: 1.0})
        layers = target_layers(models, name)
        steps = direction(layers, name, 0, seed=0)
        norms = {k: merged_row_norms(layer, name) for k, layer in layers.items()}
        for key, d in steps.items():
            assert torch.allclose(d.norm(dim=1), norms[key], rtol=1e-5)  # filter-normalised to ‖W'_i‖
        unit[name] = {key: d / norms[key][:, None] for key, d in steps.items()}
        with paper_noise(layers, 0.1, seed=0) as perturber:  # draw 1: the same N(0, 1) numbers, own σ
            perturber.set_step(1)
            standard[name] = {key: probe_noise(layer) / row_sigma(layer, name, 0.1)[:, None]
                              for key, layer in layers.items()}
    assert unit["a"].keys() == unit["b"].keys()
    for key in unit["a"]:
        torch.testing.assert_close(unit["a"][key], unit["b"][key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(standard["a"][key], standard["b"][key], rtol=0, atol=1e-4)
    other = direction(target_layers(models, "b"), "b", 1, seed=0)
    assert not torch.allclose(other[key] / merged_row_norms(target_layers(models, "b")[key], "b")[:, None],
                              unit["b"][key])


def test_each_adapter_measures_the_same_alone_or_after_another_and_the_base_is_untouched(
        tiny_sd_path, sd_adapter_dir, other_adapter_dir):
    from diffusers import UNet2DConditionModel

    settings = {"radii": (0, 0.1), "directions": 2}
    alone = measure_flatness(sd_config(tiny_sd_path, {"dog": sd_adapter_dir}, **settings), progress=False)
    after = measure_flatness(sd_config(tiny_sd_path, {"other": other_adapter_dir, "dog": sd_adapter_dir}, **settings),
                             progress=False)
    for key in ("loss", "expected", "directions"):
        assert after["adapters"]["dog"][key] == alone["adapters"]["dog"][key], key
    assert after["adapters"]["other"]["loss"] != alone["adapters"]["dog"]["loss"]
    # Paired against the first adapter: the per-draw difference of sharpness, mean and standard error.
    dog, other = after["adapters"]["dog"], after["adapters"]["other"]
    assert dog["paired"]["reference"] == "other" and dog["paired"]["same_noise"]
    diffs = [(a - dog["loss"]) - (b - other["loss"])
             for a, b in zip(dog["expected"]["0.1"]["draws"], other["expected"]["0.1"]["draws"], strict=True)]
    paired = dog["paired"]["sharpness"]["0.1"]
    assert paired["delta_sharpness"] == pytest.approx(sum(diffs) / 2)
    assert paired["sem"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # two draws: s / √2 = |d1 − d2| / 2
    assert other["paired"]["sharpness"]["0.1"] == {"radius": 0.1, "delta_sharpness": 0.0, "sem": 0.0}
    assert after["data"]["timesteps"] == alone["data"]["timesteps"]
    # After both adapters, their noise and their directions, the unloaded base is the one on disk, bit for bit.
    world = open_world(sd_config(tiny_sd_path, {"dog": sd_adapter_dir, "other": other_adapter_dir}))
    for name in ("dog", "other"):
        layers = world.activate(name)
        clean = world.loss()
        expected_losses(world.loss, layers, [0.2], 2, seed=0, sampler="gaussian", clean=clean)
        direction_curves(world.loss, layers, name, [-0.1, 0.1], 1, seed=0, clean=clean)
    world.close()
    state = world.components.denoiser.state_dict()
    before = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)


def test_sdxl_adapter_with_both_text_encoders_is_measured(tiny_sdxl_path, sdxl_adapter_dir):
    world = open_world(sd_config(tiny_sdxl_path, {"xl": sdxl_adapter_dir}))
    try:
        layers = world.activate("xl")
        assert {name.split(".")[0] for name in layers} == {"unet", "text_encoder", "text_encoder_2"}
        assert len(world.sizes["original_sizes"]) == 4  # SDXL micro-conditioning of every triple
        clean = world.loss()
        noisy = expected_losses(world.loss, layers, [0.2], 2, seed=0, sampler="gaussian", clean=clean)["0.2"]
    finally:
        world.close()
    assert math.isfinite(clean) and noisy["draws"][0] != clean


def test_cli_writes_json_csv_and_both_charts(tiny_sd_path, sd_adapter_dir, other_adapter_dir, tmp_path, capsys):
    code = main(["--base", str(tiny_sd_path), "--adapters", f"dog={sd_adapter_dir}", str(other_adapter_dir),
                 "--data", str(demo_subject_dir()), "--out", str(tmp_path), "--radii", "0,0.05", "--draws", "2",
                 "--directions", "1", "--alpha_points", "3", "--samples", "2", "--resolution", "32", "--no_progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "flatness.json").read_text())
    assert list(report["adapters"]) == ["dog", "sd_other"]
    dog = report["adapters"]["dog"]
    assert set(dog["expected"]) == {"0", "0.05"} and dog["directions"]["alphas"] == [-0.2, 0.0, 0.2]
    assert len(dog["directions"]["losses"]) == 1 and dog["directions"]["losses"][0][1] == dog["loss"]
    assert report["settings"]["seed"] == 0 and report["seconds"] > 0 and "packages" in report["environment"]
    lines = (tmp_path / "flatness.csv").read_text().splitlines()
    assert lines[0] == "adapter,measure,x,direction,loss,sem,sharpness,n" and len(lines) == 1 + 2 * (2 + 2 + 3)
    for picture in ("flatness.png", "directions.png"):
        assert (tmp_path / picture).stat().st_size > 1000
    assert "dog: L(0) =" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# LLM adapters


@pytest.fixture(scope="module")
def llm_adapter(tiny_llama_path, tmp_path_factory) -> tuple[Path, Path]:
    """A random peft LoRA on the tiny Llama's q/v projections, and GSM8K-format rows."""
    from transformers import AutoModelForCausalLM

    from flatlora_diffusion.llm.synthetic import write_splits

    root = tmp_path_factory.mktemp("llm_flat")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(root / "run" / "adapter")
    _, test = write_splits(root / "data", n_train=8, n_test=8, seed=0)
    return root / "run", test


def test_llm_plain_loss_is_the_models_token_mean_loss(tiny_llama_path, llm_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, data = llm_adapter
    config = FlatnessConfig(base=str(tiny_llama_path), adapters={"qv": str(run)}, data=str(data), samples=6,
                            batch_size=4, radii=(0, 0.1), draws=2, directions=1, alpha_points=3)
    report = measure_flatness(config, progress=False)
    result = report["adapters"]["qv"]
    assert report["kind"] == "llm" and result["target_layers"] == 4  # q_proj and v_proj of two layers
    # Independently: all six rows in one padded batch, the model's own mean over the response tokens.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:6]]
    prompts = [f"Question: {r['question'].strip()}\nAnswer:" for r in rows]
    texts = [p + " " + r["answer"].strip() for p, r in zip(prompts, rows, strict=True)]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path), str(run / "adapter"))
    total = count = 0
    with torch.no_grad():
        for prompt, text in zip(prompts, texts, strict=True):
            ids = tokenizer(text, return_tensors="pt").input_ids
            ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
            labels = ids.clone()
            labels[:, : len(tokenizer(prompt).input_ids)] = -100
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    assert report["data"]["target_tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["expected"]["0.1"]["sharpness"] != 0


def test_llm_adapter_for_another_base_is_refused(llm_adapter, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    run, data = llm_adapter
    with pytest.raises(FlatnessError, match=r"`--adapters` qv: adapter `.*run/adapter` was trained on another base model .* takes 64 inputs in the adapter, 32 here"):
        measure_flatness(FlatnessConfig(base=str(other), adapters={"qv": str(run)}, data=str(data)), progress=False)


# ---------------------------------------------------------------------------------------------
# Bad input: every error before any measurement


@pytest.mark.parametrize(("settings", "message"), [
    ({"radii": (0, 1.5)}, r"`--radii` must lie in \[0, 1\].*\[1.5\]"),
    ({"radii": (-0.1,)}, r"`--radii` must lie in \[0, 1\]"),
    ({"draws": 1}, r"`--draws` must be an integer >= 2"),
    ({"alpha_points": 4}, r"`--alpha_points` must be an odd integer"),
    ({"adapters": {}}, r"`--adapters` needs at least one"),
    ({"sampler": "fast"}, r"`--sampler` must be one of"),
])
def test_settings_are_checked(settings, message):
    values = {"base": "tiny:sd", "adapters": {"a": "x"}, "data": "d"} | settings
    with pytest.raises(FlatnessError, match=message):
        FlatnessConfig(**values)


def test_settings_errors_are_reported_together():
    with pytest.raises(FlatnessError) as info:
        FlatnessConfig(base="", adapters={}, data="", radii=(2.0,), draws=0)
    assert len(info.value.errors) == 5


def test_adapters_of_another_architecture_are_all_named_before_any_work(tiny_sdxl_path, sd_adapter_dir,
                                                                        other_adapter_dir, tmp_path):
    adapters = {"dog": sd_adapter_dir, "other": other_adapter_dir}
    with pytest.raises(FlatnessError) as info:
        measure_flatness(sd_config(tiny_sdxl_path, adapters, out=tmp_path / "out"), progress=False)
    text = str(info.value)
    assert f"`{sd_adapter_dir}` was trained on" in text and f"`{other_adapter_dir}` was trained on" in text
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_base_with_the_same_shapes_is_refused(tiny_sd_v_path, sd_adapter_dir):
    with pytest.raises(FlatnessError, match=rf"adapter `{sd_adapter_dir}` was trained on `.*`, not `--base`"):
        measure_flatness(sd_config(tiny_sd_v_path, {"dog": sd_adapter_dir}), progress=False)


def test_data_folder_without_images_and_missing_folders_are_refused(tiny_sd_path, sd_adapter_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("no adapter here")
    config = FlatnessConfig(base=str(tiny_sd_path), adapters={"dog": str(sd_adapter_dir)}, data=str(tmp_path / "empty"))
    with pytest.raises(FlatnessError, match=r"`--data` folder `.*empty` holds no images"):
        measure_flatness(config, progress=False)
    config = FlatnessConfig(base=str(tiny_sd_path), data=str(demo_subject_dir()),
                            adapters={"dog": str(sd_adapter_dir), "gone": str(tmp_path / "gone"), "no": str(tmp_path)})
    with pytest.raises(FlatnessError) as info:
        measure_flatness(config, progress=False)
    assert "`--adapters` gone: folder" in str(info.value) and "`--adapters` no: `" in str(info.value)


def unet_adapter(base: Path, out: Path, training: dict, targets: list[str] | None = None) -> Path:
    """A random UNet-only LoRA saved with the given training facts (e.g. no instance prompt)."""
    from flatlora_diffusion.adapters import save_adapter
    from flatlora_diffusion.sampling import load_pipeline

    pipe = load_pipeline(base)
    if targets is None:
        add_random_lora(pipe, text_encoders=False)
    else:
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    save_adapter(out, pipeline_class=type(pipe), denoiser=("unet", pipe.unet), base_model=str(base), prediction_type="epsilon",
                 lora_config={"rank": 4}, flat_lora=None, training=training)
    return out


def test_missing_or_conflicting_prompt_is_refused(tiny_sd_path, sd_adapter_dir, tmp_path):
    unprompted = unet_adapter(tiny_sd_path, tmp_path / "unprompted", {"steps": 1})
    cat = unet_adapter(tiny_sd_path, tmp_path / "cat", {"instance_prompt": "a photo of sks cat"})
    with pytest.raises(FlatnessError, match=r"`--prompt` is missing"):
        measure_flatness(sd_config(tiny_sd_path, {"u": unprompted}), progress=False)
    with pytest.raises(FlatnessError, match=r"different instance prompts \(dog: 'a photo of sks dog', cat: .*pass `--prompt`"):
        measure_flatness(sd_config(tiny_sd_path, {"dog": sd_adapter_dir, "cat": cat}), progress=False)
    report = measure_flatness(sd_config(tiny_sd_path, {"u": unprompted, "cat": cat}, prompt="a photo of sks ball",
                                        radii=(0,), directions=0), progress=False)
    assert report["data"]["prompts"] == ["a photo of sks ball"]


def test_adapter_of_convolutions_is_refused_before_any_work(tiny_sd_path, sd_adapter_dir, tmp_path):
    conv = unet_adapter(tiny_sd_path, tmp_path / "conv", {"instance_prompt": "a photo of sks dog"},
                        targets=["to_q", "proj_in"])  # proj_in: a 1x1 Conv2d in the tiny UNet
    with pytest.raises(FlatnessError, match=r"`--adapters` conv: adapter `.*conv` also adapts layers that are not "
                                            r"linear \(`unet\.down_blocks\.0\.attentions\.0\.proj_in`"):
        measure_flatness(sd_config(tiny_sd_path, {"dog": sd_adapter_dir, "conv": conv}, out=tmp_path / "out"),
                         progress=False)
    assert not (tmp_path / "out").exists()
