"""Adapter I/O: stock diffusers loading, exact metadata, kohya, model card, bad folders, discovery."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import add_random_lora, captured_logs, save_random_adapter
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flatlora_diffusion.adapters import (
    INFO_NAME,
    KOHYA_WEIGHTS_NAME,
    METADATA_KEY,
    WEIGHTS_NAME,
    AdapterError,
    find_adapters,
    load_adapter,
    read_adapter_info,
    save_adapter,
    write_model_card,
)
from flatlora_diffusion.sampling import SampleSettings, generate, generate_validation, load_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = SampleSettings(prompt="a photo of sks dog", seed=1, steps=2)


def _pixels(images) -> np.ndarray:
    return np.asarray(images[0]).astype(np.int16)


def _stock_pipe(path):
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_saved_adapter_loads_in_stock_pipeline_exactly(tiny_sd_path, tmp_path):
    pipe = load_pipeline(tiny_sd_path)
    encoders = add_random_lora(pipe)
    pipe.unet.train()
    trainable = {name for name, param in pipe.unet.named_parameters() if param.requires_grad}
    in_memory = _pixels(generate_validation(pipe, SETTINGS))
    assert pipe.unet.training and not pipe.vae.training, "train/eval modes must be restored"
    assert trainable == {name for name, param in pipe.unet.named_parameters() if param.requires_grad}
    info = save_adapter(tmp_path / "out", pipeline_class=StableDiffusionPipeline, denoiser=("unet", pipe.unet),
                        text_encoders=encoders, base_model=str(tiny_sd_path), prediction_type="epsilon",
                        lora_config={"rank": 4}, flat_lora=None, training={"steps": 2})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [INFO_NAME, WEIGHTS_NAME]  # no temp folder left

    stock = _stock_pipe(tiny_sd_path)
    base = _pixels(stock(SETTINGS.prompt, num_inference_steps=2, generator=_gen(1)).images)
    stock.load_lora_weights(tmp_path / "out")  # the public API, default adapter name
    assert set(stock.get_list_adapters()) == {"unet", "text_encoder"}
    loaded = _pixels(stock(SETTINGS.prompt, num_inference_steps=2, generator=_gen(1)).images)
    assert np.array_equal(loaded, in_memory)
    assert np.abs(loaded - base).max() > 20
    assert info.rho == 0 and info.schedule is None


def _gen(seed: int):
    import torch

    return [torch.Generator("cpu").manual_seed(seed)]


def test_metadata_round_trips(sd_adapter_dir, tiny_sd_path):
    info = read_adapter_info(sd_adapter_dir)
    assert (info.model_type, info.prediction_type, info.base_model) == ("sd", "epsilon", str(tiny_sd_path))
    assert (info.rank, info.alpha, info.dora) == (4, 8, False)
    assert info.components["text_encoder"]["rank"] == 2
    assert info.rho == 0.1 and info.schedule == "cosine" and info.flat_lora["total_steps"] == 2
    assert info.training == {"instance_prompt": "a photo of sks dog", "steps": 2, "seed": 0}
    assert info.kohya_file == sd_adapter_dir.resolve() / KOHYA_WEIGHTS_NAME
    sidecar = json.loads((sd_adapter_dir / INFO_NAME).read_text())
    assert sidecar["flat_lora"]["rho"] == 0.1 and sidecar["components"]["unet"]["alpha"] == 8
    stock = _stock_pipe(tiny_sd_path)
    stock.load_lora_weights(sd_adapter_dir, adapter_name="dog")
    config = stock.unet.peft_config["dog"]
    assert (config.r, config.lora_alpha, config.use_dora) == (4, 8, False)
    assert set(config.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert stock.text_encoder.peft_config["dog"].lora_alpha == 4


def test_dora_round_trips_and_refuses_kohya(tiny_sd_path, tmp_path):
    out = save_random_adapter(tiny_sd_path, tmp_path / "dora", dora=True, text_encoders=False)
    assert read_adapter_info(out).dora
    stock = _stock_pipe(tiny_sd_path)
    stock.load_lora_weights(out, adapter_name="d")
    assert stock.unet.peft_config["d"].use_dora
    with pytest.raises(AdapterError, match="`--output_kohya_format` does not support DoRA"):
        save_random_adapter(tiny_sd_path, tmp_path / "dora_kohya", dora=True, text_encoders=False, kohya=True)


def test_kohya_file_gives_identical_images(tiny_sd_path, sd_adapter_dir):
    kohya = load_file(sd_adapter_dir / KOHYA_WEIGHTS_NAME)
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {8.0, 4.0}  # the real alphas (UNet 8, text encoder 4), not the ranks
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    images = {}
    for weight_name in (WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        pipe = load_pipeline(tiny_sd_path)
        pipe.load_lora_weights(sd_adapter_dir, weight_name=weight_name, adapter_name="a")
        images[weight_name] = _pixels(generate(pipe, SETTINGS, adapters={"a": 1.0}))
    assert np.array_equal(images[WEIGHTS_NAME], images[KOHYA_WEIGHTS_NAME])


def test_sdxl_adapter_loads_all_components(tiny_sdxl_path, sdxl_adapter_dir):
    pipe = load_pipeline(tiny_sdxl_path)
    base = _pixels(generate(pipe, SETTINGS))
    info = load_adapter(pipe, sdxl_adapter_dir, "dog")
    assert info.model_type == "sdxl" and set(info.components) == {"unet", "text_encoder", "text_encoder_2"}
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert np.abs(_pixels(generate(pipe, SETTINGS, adapters={"dog": 1.0})) - base).max() > 20


def test_bad_folders_raise_adapter_error(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter_info(tmp_path / "missing")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match=r"no `pytorch_lora_weights.safetensors`.*pickle files are never loaded"):
        read_adapter_info(pickled)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / WEIGHTS_NAME).write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterError, match=f"`{corrupt / WEIGHTS_NAME}` is not a valid safetensors file"):
        read_adapter_info(corrupt)


def _rewrite(src, dst, edit):
    """Copy an adapter's weights file to `dst` with `edit(metadata)` applied."""
    dst.mkdir()
    with safe_open(str(src / WEIGHTS_NAME), framework="pt") as handle:
        metadata = dict(handle.metadata())
    edit(metadata)
    save_file(load_file(src / WEIGHTS_NAME), dst / WEIGHTS_NAME, metadata=metadata)
    return dst


def test_wrong_architecture_is_refused_and_pipeline_left_clean(tiny_sdxl_path, tiny_sd_path, sd_adapter_dir, tmp_path,
                                                               recwarn):
    pipe = load_pipeline(tiny_sdxl_path)
    base = _pixels(generate(pipe, SETTINGS))
    with pytest.raises(AdapterError, match="trained for SD .* but the pipeline is SDXL"):
        load_adapter(pipe, sd_adapter_dir, "dog")
    # Made by another tool (no metadata of ours): refused from the file's layer shapes, before diffusers
    # and peft try (and warn about every layer: "an inconsistency was discovered ...").
    foreign = _rewrite(sd_adapter_dir, tmp_path / "foreign", lambda md: md.pop(METADATA_KEY))
    assert read_adapter_info(foreign).model_type is None
    recwarn.clear()
    with pytest.raises(AdapterError, match=r"layer shapes do not match this pipeline's model \(another "
                                           r"architecture\?\): (layer )?`unet\.[\w.]+` (does not exist|has \d+)"):
        load_adapter(pipe, foreign, "dog")
    assert [str(w.message)[:80] for w in recwarn] == []
    assert not any(pipe.get_list_adapters().values())
    assert np.array_equal(_pixels(generate(pipe, SETTINGS)), base)

    def wider(metadata):
        facts = json.loads(metadata[METADATA_KEY])
        metadata[METADATA_KEY] = json.dumps({**facts, "cross_attention_dim": 1024})

    sd2 = _rewrite(sd_adapter_dir, tmp_path / "sd2", wider)
    with pytest.raises(AdapterError, match="cross-attention width 1024"):
        load_adapter(load_pipeline(tiny_sd_path), sd2, "dog")


def test_unet_only_adapter_loads_without_the_text_encoder_notice(tiny_sd_path, tmp_path):
    adapter = save_random_adapter(tiny_sd_path, tmp_path / "unet_only", text_encoders=False)
    pipe = load_pipeline(tiny_sd_path)
    with captured_logs("diffusers") as logs:
        load_adapter(pipe, adapter, "dog")
    assert logs == []  # not "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'"
    assert set(pipe.get_list_adapters()) == {"unet"}


def test_adapter_names_are_checked(tiny_sd_path, sd_adapter_dir):
    pipe = load_pipeline(tiny_sd_path)
    with pytest.raises(AdapterError, match="invalid"):
        load_adapter(pipe, sd_adapter_dir, "my.adapter")
    load_adapter(pipe, sd_adapter_dir, "dog")
    with pytest.raises(AdapterError, match="already loaded"):
        load_adapter(pipe, sd_adapter_dir, "dog")


def test_find_adapters_stays_inside_roots(sd_adapter_dir, sdxl_adapter_dir, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "runs").mkdir(parents=True)
    os.symlink(sd_adapter_dir, root / "runs" / "dog.v1")  # points outside the root: refused
    _rewrite(sd_adapter_dir, root / "runs" / "dog.v2", lambda md: None)
    _rewrite(sdxl_adapter_dir, root / "xl", lambda md: None)
    (root / "broken").mkdir()
    (root / "broken" / WEIGHTS_NAME).write_bytes(b"garbage")
    outside.mkdir()
    (root / "runs" / "link.safetensors").mkdir()
    os.symlink(sd_adapter_dir / WEIGHTS_NAME, root / "runs" / "link.safetensors" / WEIGHTS_NAME)
    found = find_adapters([root])
    assert [(info.name, info.model_type) for info in found] == [("runs_dog_v2", "sd"), ("xl", "sdxl")]
    assert all(info.path.is_relative_to(root.resolve()) for info in found)
    with pytest.raises(AdapterError, match="does not exist"):
        find_adapters([tmp_path / "nope"])


def test_model_card_lists_settings_and_images(sd_adapter_dir, tmp_path):
    info = read_adapter_info(sd_adapter_dir)
    out = info.path
    image = out / "validation" / "final" / "image_000.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"png")
    card = write_model_card(out, info, [image]).read_text()
    for text in ("a photo of sks dog", "Flat-LoRA ρ | 0.1", "cosine", "unet: rank / alpha | 4 / 8",
                 "pipe.load_lora_weights", "](validation/final/image_000.png)", KOHYA_WEIGHTS_NAME):
        assert text in card, text
    assert "base_model:" not in card  # a local folder is no Hub id: no Hub metadata for it
    assert read_adapter_info(out).validation_images == [image.resolve()]
    with pytest.raises(AdapterError, match="must be inside"):
        write_model_card(out, info, [tmp_path / "elsewhere.png"])
    hub_info = replace(info, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert 'base_model: "stable-diffusion-v1-5/stable-diffusion-v1-5"' in write_model_card(out, hub_info, [image]).read_text()
    write_model_card(out, info, [image])  # the shared fixture as it was


def _how_to_use(card: str) -> str:
    return card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("base", ["folder", "tiny:sd"])
def test_model_card_how_to_use_runs_when_copied(base, sd_adapter_dir, tmp_path, monkeypatch):
    """The card's code, pasted as is, loads the base (a folder, or a built-in id through `resolve_model_id`)
    and the adapter on this machine's device and dtype, and samples the instance prompt."""
    info = read_adapter_info(sd_adapter_dir)
    if base == "tiny:sd":  # the fixture's tiny SD is `tiny:sd` (same factory, seed 0), built here afresh
        monkeypatch.setenv("FLATLORA_CACHE", str(tmp_path / "cache"))
        info.base_model = "tiny:sd"
    out = tmp_path / "adapter"
    shutil.copytree(sd_adapter_dir, out)
    code = _how_to_use(write_model_card(out, info).read_text())
    assert "float16 if device == \"cuda\"" in code and str(out.resolve()) in code
    assert ("resolve_model_id('tiny:sd')" in code) == (base == "tiny:sd")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # verbatim: the pipeline's default 50 steps
    assert (tmp_path / "sample.png").is_file()
