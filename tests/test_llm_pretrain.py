"""The toy Llama: its pretraining language, a killed pretraining resumes exactly, bad flags, the `toy:llama` id."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flatlora_diffusion.llm.pretrain as pretrain_module
from flatlora_diffusion.llm.__main__ import main as cli
from flatlora_diffusion.llm.language import document
from flatlora_diffusion.llm.pretrain import PretrainError, PretrainSettings, pretrain
from flatlora_diffusion.llm.synthetic import make_problems
from flatlora_diffusion.model_ids import ModelIdError, resolve_model_id

SMALL = PretrainSettings(minutes=6 / pretrain_module.STEPS_PER_MINUTE, batch_size=2, length=48)


class Killed(Exception):
    pass


@pytest.fixture
def small_runs(monkeypatch):
    """A checkpoint after every step and a 20-equation probe, so a 6-step run takes a few seconds."""
    monkeypatch.setattr(pretrain_module, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(pretrain_module, "PROBE", 20)
    return SMALL


def test_language_keeps_the_demo_layout_and_the_ood_templates_out():
    text = "\n".join(document(random.Random(seed), 2000) for seed in range(20))
    for marker in ("Question:", "Answer:", "####", "How many"):
        assert marker not in text
    unseen = make_problems(8, kinds=("unseen_add", "unseen_sub", "unseen_mul", "unseen_two_step"))
    for row in unseen:  # the first five words of every unseen template appear nowhere in pretraining
        assert " ".join(row["question"].split()[:5]) not in text
    assert document(random.Random(1), 300) == document(random.Random(1), 300) != document(random.Random(2), 300)
    assert len(document(random.Random(0), 300)) >= 300


def test_a_killed_pretraining_resumes_exactly(small_runs, tmp_path, monkeypatch):
    assert small_runs.steps == 6
    pretrain(tmp_path / "whole", small_runs)
    original = pretrain_module.batch

    def dying(tokenizer, settings, step):
        if step == 4:
            raise Killed
        return original(tokenizer, settings, step)

    monkeypatch.setattr(pretrain_module, "batch", dying)
    with pytest.raises(Killed):
        pretrain(tmp_path / "killed", small_runs)
    assert torch.load(tmp_path / "killed/state/pretrain.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(pretrain_module, "batch", original)
    pretrain(tmp_path / "killed", small_runs)  # the same command resumes
    whole = load_file(tmp_path / "whole/llama/model.safetensors")
    resumed = load_file(tmp_path / "killed/llama/model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    manifests = [json.loads((tmp_path / name / "MANIFEST.json").read_text()) for name in ("whole", "killed")]
    assert manifests[0]["sha256"] == manifests[1]["sha256"] and manifests[0]["history"] == manifests[1]["history"]
    assert manifests[0]["steps"] == 6 and "--minutes" in manifests[0]["command"]
    # `until` exports mid-schedule; the same command without it continues to the uninterrupted weights.
    pretrain(tmp_path / "cut", small_runs, until=3)
    cut = json.loads((tmp_path / "cut/MANIFEST.json").read_text())
    assert cut["steps"] == 3 and cut["schedule_steps"] == 6 and cut["command"].endswith("--until 3")
    with pytest.raises(PretrainError, match="already at step 3; pass `--until` 3 or more"):
        pretrain(tmp_path / "cut", small_runs, until=2)
    pretrain(tmp_path / "cut", small_runs)
    assert json.loads((tmp_path / "cut/MANIFEST.json").read_text())["sha256"] == manifests[0]["sha256"]


def test_other_settings_and_bad_flags_are_refused(small_runs, tmp_path, capsys):
    pretrain(tmp_path / "run", small_runs)
    with pytest.raises(PretrainError, match="other settings.*--resume.*--overwrite"):
        pretrain(tmp_path / "run", PretrainSettings(minutes=1.0, batch_size=2, length=48))
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(PretrainError, match="not empty and holds no pretraining run"):
        pretrain(tmp_path / "stuff", small_runs)
    with pytest.raises(PretrainError, match="holds no pretraining run to resume"):
        pretrain(tmp_path / "empty", small_runs, resume=True)
    with pytest.raises(PretrainError, match="`length` must be at most 512"):
        pretrain(tmp_path / "long", PretrainSettings(length=1000))
    for flags, message in ((["--minutes", "0"], "`--minutes` must be positive"),
                           (["--threads", "0"], "`--threads` must be 1 or more"),
                           (["--device", "tpu"], "`--device` must be cpu or cuda"),
                           (["--until", "99999"], "`--until` must be a step from 1 to 3000")):
        assert cli(["pretrain", str(tmp_path / "x"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_toy_llama_resolves_loads_and_is_small(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_id("toy:llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and AutoTokenizer.from_pretrained(path).is_fast
    weights = sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))
    assert 0 < weights <= 10 * 2**20
    copy = tmp_path / "weights"
    shutil.copytree(Path(path).parent, copy)
    monkeypatch.setenv("FLATLORA_TOY_LLM_DIR", str(copy))
    (copy / "llama" / "config.json").write_text("{}")
    with pytest.raises(ModelIdError, match="config.json` does not match its checksum.*llm pretrain"):
        resolve_model_id("toy:llama", "--model")


def test_toy_llama_knows_its_arithmetic():
    """The shipped base answers `a op b =` (operands 0-15, +, -, *) greedily: 99% in its manifest, >= 90% here.

    These equations are not held out from pretraining (there are only 768 of them): this pins what the
    base learned, which the LoRA fine-tune then has to connect to the GSM8K question format.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flatlora_diffusion.llm.pretrain import equation_accuracy

    path = resolve_model_id("toy:llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert equation_accuracy(model, tokenizer, n=100, seed=123) >= 0.9
