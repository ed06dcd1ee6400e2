"""Pretraining the toy world: folder checks, and a killed stage resumes to exactly the uninterrupted result.

The stages run here at toy sizes (a few hundred renders, 30 steps) through the real `pretrain` code.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import flatlora_diffusion.toyworld.pretrain as pretrain_module
from flatlora_diffusion.toyworld.__main__ import main as cli
from flatlora_diffusion.toyworld.pretrain import PretrainError, PretrainSettings, pretrain


@pytest.fixture
def small_stages(monkeypatch):
    """30 steps per stage, small render pools, a checkpoint after every step."""
    monkeypatch.setattr(pretrain_module, "POOL", {k: 200 for k in pretrain_module.POOL})
    monkeypatch.setattr(pretrain_module, "SHARES", {k: 1.0 for k in pretrain_module.SHARES})
    monkeypatch.setattr(pretrain_module, "RATES", {k: 300.0 for k in pretrain_module.RATES})
    monkeypatch.setattr(pretrain_module, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(pretrain_module, "HELD_OUT", 200)
    return PretrainSettings(minutes=0.1)


class Killed(Exception):
    pass


def _kill_at(monkeypatch, stage: str, step: int):
    """Make `stage` die (like a kill) when it reaches `step`."""
    original = pretrain_module._generator

    def generator(settings, name, at):
        if name == stage and at == step:
            raise Killed
        return original(settings, name, at)

    monkeypatch.setattr(pretrain_module, "_generator", generator)
    return original


def test_a_killed_stage_resumes_exactly(small_stages, tmp_path, monkeypatch):
    settings = small_stages
    assert settings.steps("vit") == 30
    pretrain(tmp_path / "whole", settings, stages=("vit",))
    original = _kill_at(monkeypatch, "vit", 17)
    with pytest.raises(Killed):
        pretrain(tmp_path / "killed", settings, stages=("vit",))
    state = torch.load(tmp_path / "killed/state/vit.pt", weights_only=False)
    assert state["step"] == 17  # the checkpoint of the last finished step survived
    monkeypatch.setattr(pretrain_module, "_generator", original)
    pretrain(tmp_path / "killed", settings, stages=("vit",))  # the same command resumes
    whole = load_file(tmp_path / "whole/state/vit/model.safetensors")
    resumed = load_file(tmp_path / "killed/state/vit/model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert json.loads((tmp_path / "killed/state/vit.json").read_text())["steps"] == 30


def test_the_folder_of_another_run_is_refused(small_stages, tmp_path):
    out = tmp_path / "run"
    pretrain(out, small_stages, stages=("vit",))
    with pytest.raises(PretrainError, match="other settings.*--resume.*--overwrite"):
        pretrain(out, PretrainSettings(minutes=0.2), stages=("vit",))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PretrainError, match="not empty and holds no pretraining run"):
        pretrain(tmp_path / "other", small_stages)
    with pytest.raises(PretrainError, match="holds no pretraining run to resume"):
        pretrain(tmp_path / "empty", small_stages, resume=True)
    # --resume continues the folder's run with its own settings; --overwrite starts again.
    pretrain(out, PretrainSettings(minutes=0.2), stages=("vit",), resume=True)
    pretrain(out, PretrainSettings(minutes=0.2), stages=("vit",), overwrite=True)
    assert json.loads((out / "state/run.json").read_text())["settings"]["minutes"] == 0.2


def test_unet_stage_needs_its_inputs_and_cli_checks_flags(small_stages, tmp_path, capsys):
    with pytest.raises(PretrainError, match="needs the `vae` and `clip` stages"):
        pretrain(tmp_path / "run", small_stages, stages=("unet",))
    with pytest.raises(SystemExit):
        cli(["pretrain", str(tmp_path / "x"), "--stages", "unet", "decoder"])
    assert "unknown decoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["pretrain", str(tmp_path / "x"), "--minutes", "0"])
    assert "`--minutes` must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["pretrain", str(tmp_path / "x"), "--unet_extra_steps", "-1"])
    assert "`--unet_extra_steps` must be 0 or more" in capsys.readouterr().err


def test_step_counts_are_a_function_of_the_budget_only():
    assert PretrainSettings(minutes=90).steps("unet") == PretrainSettings(minutes=90, seed=1).steps("unet")
    assert PretrainSettings(minutes=45).steps("unet") < PretrainSettings(minutes=90).steps("unet")


def test_unet_extra_steps_extend_a_finished_run_exactly_as_a_run_from_scratch(small_stages, tmp_path, monkeypatch):
    """Every stage, 20 steps of batch 4 on 64 renders: the cheapest whole run, twice."""
    monkeypatch.setattr(pretrain_module, "POOL", {k: 64 for k in pretrain_module.POOL})
    monkeypatch.setattr(pretrain_module, "BATCH", {k: 4 for k in pretrain_module.BATCH})
    monkeypatch.setattr(pretrain_module, "HELD_OUT", 64)
    settings = PretrainSettings(minutes=0.01)
    assert settings.steps("unet") == 20
    extended = replace(settings, unet_extra_steps=20)
    pretrain(tmp_path / "scratch", extended)
    pretrain(tmp_path / "run", settings)
    first = load_file(tmp_path / "run/sd/unet/diffusion_pytorch_model.safetensors")
    pretrain(tmp_path / "run", extended)  # the finished run's command plus the flag
    scratch = load_file(tmp_path / "scratch/sd/unet/diffusion_pytorch_model.safetensors")
    continued = load_file(tmp_path / "run/sd/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(scratch[k], continued[k]) for k in scratch)
    assert not all(torch.equal(first[k], continued[k]) for k in first)
    manifest = json.loads((tmp_path / "run/MANIFEST.json").read_text())
    assert manifest["steps"]["unet_continued"] == 20 and "--unet_extra_steps 20" in manifest["command"]
    with pytest.raises(PretrainError, match="needs the `unet` stage:"):
        pretrain(tmp_path / "alone", extended, stages=("unet_continued",))
