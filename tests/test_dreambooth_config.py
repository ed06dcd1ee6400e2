"""The trainer's typed config: flags, YAML, precedence, validation (every error at once), presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flatlora_diffusion.dreambooth.config import (
    FLAGS,
    MAX_RHO,
    REFUSED,
    ConfigError,
    TrainConfig,
    build_parser,
    load_config,
)
from flatlora_diffusion.dreambooth.data import RESAMPLE

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["--pretrained_model_name_or_path", "tiny:sd", "--instance_data_dir", "imgs", "--instance_prompt", "a sks dog"]


def write_yaml(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_follow_the_diffusers_scripts_and_the_paper():
    config = load_config(REQUIRED)
    assert config.lora.rank == 4 and config.lora.alpha == 4.0  # alpha defaults to the rank
    assert config.lora.lora_target_modules is None  # the family's attention projections (`ModelFamily.lora_targets`)
    assert config.lora.text_encoder_target_modules == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert config.flat.rho == 0.1 and config.flat.schedule == "cosine" and config.flat.interval == 1
    assert config.flat.seed is None  # the trainer uses `--seed`
    assert config.optim.lr_scheduler == "constant" and config.optim.learning_rate == 1e-4
    assert config.logging.report_to == "tensorboard" and config.checkpoint.checkpointing_steps == 500
    assert config.optim.seed is None and config.optim.lr_warmup_steps == 0 and config.validation.validation_epochs is None
    assert config.data.resolution is None and config.optim.adam_weight_decay is None  # set by the model family


@pytest.mark.parametrize(("family", "resolution", "weight_decay", "scheme"), [
    ("sd", 512, 1e-2, None), ("sdxl", 1024, 1e-4, None), ("sd3", 512, 1e-4, "logit_normal"), ("flux", 512, 1e-4, "none")])
def test_per_family_defaults_are_diffusers(family, resolution, weight_decay, scheme):
    """diffusers' `train_dreambooth_lora.py` / `_sdxl.py` / `_sd3.py` / `_flux.py` defaults; values given by
    the user are kept."""
    config = load_config(REQUIRED).with_family_defaults(family)
    assert (config.data.resolution, config.optim.adam_weight_decay) == (resolution, weight_decay)
    assert config.optim.weighting_scheme == scheme
    assert config.optim.precondition_outputs == {"sd3": True, "flux": False}.get(family)
    assert config.model.max_sequence_length == {"sd3": 77, "flux": 512}.get(family)
    given = load_config([*REQUIRED, "--resolution", "256", "--adam_weight_decay", "0"]).with_family_defaults(family)
    assert (given.data.resolution, given.optim.adam_weight_decay) == (256, 0.0)


def test_every_flag_has_help_and_one_owner():
    assert all(flag.help for flag in FLAGS.values())
    help_text = build_parser().format_help()
    for name in ("--rho", "--flat_schedule", "--flat_interval", "--lora_alpha", "--with_prior_preservation",
                 "--snr_gamma", "--resume_from_checkpoint", "--output_kohya_format", "--enable_bucketing"):
        assert name in help_text


def test_command_line_overrides_yaml_and_lists_parse(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {
        "pretrained_model_name_or_path": "tiny:sd", "instance_data_dir": "imgs", "instance_prompt": "a sks dog",
        "rank": 8, "learning_rate": "1e-4",  # PyYAML reads `1e-4` as a string: accepted for a float
        "lora_target_modules": "to_q,to_v", "train_text_encoder": True,
    })
    config = load_config(["--config", str(path), "--rank", "16", "--no-train_text_encoder", "--rho", "0"])
    assert config.lora.rank == 16 and config.lora.alpha == 16.0
    assert config.optim.learning_rate == 1e-4
    assert config.lora.lora_target_modules == ["to_q", "to_v"]
    assert config.lora.train_text_encoder is False and config.flat.rho == 0.0
    assert load_config([*REQUIRED, "--lora_target_modules", "to_k, to_out.0"]).lora.lora_target_modules == [
        "to_k", "to_out.0"]


def test_yaml_unknown_keys_and_wrong_types_are_rejected_together(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"learnig_rate": 1.0, "rank": "four", "use_dora": "yes",
                                              "lora_target_modules": 3})
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(path)])
    message = str(info.value)
    assert "Unknown setting `learnig_rate`" in message and "Did you mean `learning_rate`?" in message
    assert "`rank`" in message and "must be an integer" in message
    assert "`use_dora`" in message and "`lora_target_modules`" in message
    assert "`--instance_prompt` is required" in message  # the missing flags too, in the same error


def test_unreadable_or_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="`--config` file .* does not exist"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="must be a mapping of flag names"):
        load_config(["--config", str(write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"))])
    with pytest.raises(ConfigError, match="not readable YAML"):
        load_config(["--config", str(write_yaml(tmp_path / "broken.yaml", "rank: [1, 2\n"))])


def test_all_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(["--rank", "0", "--rho", "-1", "--resolution", "30", "--seed", "abc", "--lr_scheduler", "nope",
                     "--learnign_rate", "1", "--flat_schedule", "sine"])
    errors = info.value.errors
    joined = "\n".join(errors)
    for expected in ("`--rank` must be an integer >= 1, got 0", f"`--rho` must be a number in [0, {MAX_RHO}]",
                     "`--resolution` must be a positive multiple of 8", "try 24 or 32", "`--seed` must be an integer",
                     "`--lr_scheduler` must be one of", "Unknown flag `--learnign_rate`", "`--learning_rate`?",
                     "`--flat_schedule` must be one of", "`--pretrained_model_name_or_path` is required"):
        assert expected in joined
    assert len(errors) >= 9
    assert str(info.value).endswith("(Files -- images, model, checkpoint -- are checked once the settings are valid.)")


@pytest.mark.parametrize(("args", "match"), [
    (["--rank", "0"], r"`--rank` must be an integer >= 1, got 0"),
    (["--rho", "-0.1"], rf"`--rho` must be a number in \[0, {MAX_RHO}\], got -0.1\. Use 0.05-0.2"),
    (["--rho", "0.8"], rf"`--rho` must be a number in \[0, {MAX_RHO}\], got 0.8 \(the noise norm would be 80%"),
    (["--rho", "nan"], rf"`--rho` must be a number in \[0, {MAX_RHO}\], got nan"),
    (["--resolution", "500"], r"`--resolution` must be a positive multiple of 8 .* got 500; try 496 or 504"),
    (["--lora_dropout", "1.5"], r"`--lora_dropout` must be in \[0, 1\)"),
    (["--with_prior_preservation"], r"`--with_prior_preservation` needs `--class_data_dir`"),
    (["--validation_steps", "5", "--validation_epochs", "1"], r"either `--validation_steps` or `--validation_epochs`"),
    (["--dataset_name", "x/y"], r"either `--instance_data_dir` or `--dataset_name`"),
    (["--flat_interval", "0"], r"`--flat_interval` must be an integer >= 1"),
    (["--mixed_precision", "fp8"], r"`--mixed_precision` must be one of no, fp16, bf16"),
    (["--bucket_step", "12"], r"`--bucket_step` must be a multiple of 8"),
    (["--image_interpolation_mode", "cubic"], r"`--image_interpolation_mode` must be one of bicubic, bilinear"),
    (["--optimizer", "sgd"], r"`--optimizer` must be `adamw` or `prodigy`, got 'sgd'"),
    (["--pre_compute_text_embeddings", "--train_text_encoder"], r"cannot be combined with `--train_text_encoder`"),
    (["--hub_model_id", "me/dog"], r"`--hub_model_id` is used only with `--push_to_hub`"),
    (["--prior_generation_precision", "fp8"], r"`--prior_generation_precision` must be one of no, fp32, fp16, bf16"),
])
def test_bad_values_name_the_flag(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config([*REQUIRED, *args])


@pytest.mark.parametrize(("args", "match"), [
    (["--optimizer", "prodigy"], r"`--optimizer prodigy` needs the `prodigyopt` package: `pip install prodigyopt`"),
    (["--use_8bit_adam"], r"`--use_8bit_adam` needs the `bitsandbytes` package"),
    (["--enable_xformers_memory_efficient_attention"], r"needs the `xformers` package .* PyTorch SDPA"),
    (["--report_to", "wandb"], r"`--report_to wandb` needs the `wandb` package"),
    (["--mixed_precision", "fp16"], r"`--mixed_precision fp16` needs a CUDA GPU; use `bf16` or `no`"),
    (["--prior_generation_precision", "fp16"], r"`--prior_generation_precision fp16` needs a CUDA GPU"),
])
def test_missing_optional_extras_fail_clearly(args, match, monkeypatch):
    import flatlora_diffusion.dreambooth.config as config_module

    monkeypatch.setattr(config_module, "_installed", lambda module: False)
    monkeypatch.setattr(config_module, "_cuda_available", lambda: False)
    with pytest.raises(ConfigError, match=match):
        load_config([*REQUIRED, *args])


def test_diffusers_spellings_are_accepted(tmp_path):
    """What users of diffusers' scripts type: `AdamW`, torchvision's interpolation names, launcher ranks."""
    config = load_config([*REQUIRED, "--optimizer", "AdamW", "--image_interpolation_mode", "BICUBIC",
                          "--pre_compute_text_embeddings", "--local_rank", "0"])
    assert config.optim.optimizer == "adamw" and config.data.image_interpolation_mode == "bicubic"
    assert config.lora.pre_compute_text_embeddings and "local_rank" not in config.to_flags()
    assert load_config([*REQUIRED, "--local-rank=1"]) == load_config(REQUIRED)  # torchrun's spelling
    typed = load_config([*REQUIRED, "--prodigy_decouple=False", "--center_crop", "True", "--random_flip"])
    assert (typed.optim.prodigy_decouple, typed.data.center_crop, typed.data.random_flip) == (False, True, True)
    with pytest.raises(ConfigError, match=r"`--center_crop` must be true or false, got 'maybe'"):
        load_config([*REQUIRED, "--center_crop", "maybe"])
    path = write_yaml(tmp_path / "c.yaml", {"optimizer": "Prodigy", "image_interpolation_mode": "nearest_exact"})
    mixed = load_config(["--config", str(path), *REQUIRED, "--optimizer", "ADAMW"])
    assert mixed.optim.optimizer == "adamw" and mixed.data.image_interpolation_mode == "nearest_exact"
    assert set(FLAGS["image_interpolation_mode"].choices) == set(RESAMPLE) == {
        "nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"}  # torchvision's modes


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_diffusers_flags_say_why(name, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config([*REQUIRED, f"--{name}", "77", "--rank", "0"])
    assert info.value.errors[0] == f"`--{name}` on the command line (a flag of diffusers' scripts) is not supported: " \
                                   f"{REFUSED[name]}"
    assert not any("Unexpected argument" in e for e in info.value.errors)  # its value is not reported again
    assert "`--rank` must be an integer >= 1" in info.value.errors[1]  # and the other errors still come
    with pytest.raises(ConfigError, match=rf"`{name}` in `.*c.yaml` \(a flag of diffusers' scripts\) is not supported"):
        load_config(["--config", str(write_yaml(tmp_path / "c.yaml", {name: 1})), *REQUIRED])
    assert f"--{name}" in build_parser().format_help()  # listed in `--help`


def test_hub_token_is_never_written(tmp_path):
    config = load_config([*REQUIRED, "--push_to_hub", "--hub_model_id", "me/dog", "--hub_token", "hf_secret"])
    assert config.checkpoint.hub_token == "hf_secret" and config.resolved().checkpoint.hub_token == "hf_secret"
    assert config.to_flags()["hub_token"] is None  # what config.yaml, checkpoints and trackers get
    assert "hf_secret" not in config.save_yaml(tmp_path / "config.yaml").read_text()


def test_resolved_config_round_trips(tmp_path):
    config = load_config([*REQUIRED, "--rank", "8", "--lora_alpha", "4", "--seed", "3", "--rho", "0.05"])
    path = config.save_yaml(tmp_path / "out" / "config.yaml", header="resolved")
    assert path.read_text().startswith("# resolved\n")
    again = load_config(["--config", str(path)])
    assert again == config and again.to_flags() == config.to_flags()
    assert TrainConfig.from_flags(config.to_flags()) == config


def test_none_on_the_command_line_clears_an_optional_flag(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"checkpoints_total_limit": 3, "validation_prompt": "x"})
    config = load_config(["--config", str(path), *REQUIRED, "--checkpoints_total_limit", "none"])
    assert config.checkpoint.checkpoints_total_limit is None and config.validation.validation_prompt == "x"


DREAMBOOTH_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml")
                            if "train_dreambooth_flatlora.py" in p.read_text().split("\n\n")[0])


def test_the_presets_exist():
    assert {p.name for p in DREAMBOOTH_CONFIGS} >= {"demo.yaml", "sd15_dreambooth.yaml", "sdxl_3d_icons.yaml",
                                                     "sd35_dreambooth.yaml", "flux_dreambooth.yaml"}


@pytest.mark.parametrize("path", DREAMBOOTH_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path, monkeypatch):
    import flatlora_diffusion.dreambooth.config as config_module

    monkeypatch.setattr(config_module, "_cuda_available", lambda: True)  # the GPU presets use fp16
    assert path.read_text().startswith("#")  # header: what it is and the command that runs it
    config = load_config(["--config", str(path)])
    assert config.flat.rho > 0
    if path.name == "sdxl_3d_icons.yaml":  # the paper's run
        assert (config.optim.max_train_steps, config.optim.learning_rate, config.optim.train_batch_size) == (500, 1e-4, 1)
        assert config.lora.rank == 4 and config.lora.alpha == 4 and config.flat.rho == 0.1
        assert config.optim.lr_scheduler == "constant"
        assert "stable-diffusion-xl" in config.model.pretrained_model_name_or_path
    family = {"sd35_dreambooth.yaml": "sd3", "flux_dreambooth.yaml": "flux"}.get(path.name)
    if family is not None:  # the flow-matching presets fit their family (FLUX.1-dev has a guidance embedding)
        assert config.family_errors(family, guidance_embeds=family == "flux", num_blocks=24) == []
        assert "Expected GPU memory" in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert path.read_text().startswith("#") and "accelerate launch --config_file" in path.read_text()
    cluster = load_config_from_file(str(path))
    assert cluster.num_processes >= 1
    assert {p.name for p in path.parent.glob("*.yaml")} == {"single_gpu.yaml", "multi_gpu.yaml", "cpu.yaml"}
