"""`python -m eval dreambench` end to end: tiny SD, two runs of tiny adapters, two subjects; resume; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import cli
from eval.errors import EvalError
from eval.generation import resolve_runs
from flatlora_diffusion import sampling

SUBJECTS = ("dog", "can")


def _adapter(sd: Path, out: Path, seed: int, rho: float, noun: str) -> None:
    """A random (non-zero) LoRA on the tiny UNet, saved as a trainer output folder."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    from flatlora_diffusion.adapters import save_adapter

    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    save_adapter(out, pipeline_class=StableDiffusionPipeline, denoiser=("unet", unet), base_model=str(sd), prediction_type="epsilon",
                 lora_config={"rank": 4, "alpha": 4}, flat_lora={"rho": rho, "schedule": "cosine"} if rho else None,
                 training={"instance_prompt": f"a photo of sks {noun}"})


@pytest.fixture(scope="module")
def runs(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs (plain LoRA, Flat-LoRA ρ=0.05), one adapter per subject: `<run>/<subject>/`."""
    root = tmp_path_factory.mktemp("runs")
    for r, (name, rho) in enumerate((("lora", 0.0), ("flat", 0.05))):
        for s, (subject, noun) in enumerate(zip(SUBJECTS, ("dog", "can"), strict=True)):
            _adapter(tiny_sd_path, root / name / subject, seed=10 * r + s, rho=rho, noun=noun)
    return {"lora": root / "lora", "flat": root / "flat"}


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and shared CI cores make them spin: pin one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _argv(tiny_sd_path, runs, dreambench_dir, out, tiny_clip_path, tiny_dino_path, *extra) -> list[str]:
    return ["dreambench", "--base", str(tiny_sd_path), "--adapters", f"lora={runs['lora']}", f"flat={runs['flat']}",
            "--dataset", str(dreambench_dir), "--subjects", *SUBJECTS, "--images_per_prompt", "2", "--steps", "2",
            "--out", str(out), "--dino_model", str(tiny_dino_path), "--clip_model", str(tiny_clip_path),
            "--device", "cpu", "--cache_dir", str(out.parent / "cache"), *extra]


def test_dreambench_end_to_end_and_resume(tiny_sd_path, runs, dreambench_dir, tiny_clip_path, tiny_dino_path,
                                          tmp_path, monkeypatch, capsys, one_thread) -> None:
    out = tmp_path / "eval"
    argv = _argv(tiny_sd_path, runs, dreambench_dir, out, tiny_clip_path, tiny_dino_path,
                 "--max_prompts", "6", "--div", "--pres", "--pres_images", "2")
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "0 image(s) on disk, 56 to generate" in stdout  # 2 runs x 2 subjects x (6 prompts x 2 + 2 class images)
    assert {p.name for p in out.iterdir()} == {"images", "results.json", "per_subject.csv", "summary.csv",
                                               "report.md", "metrics.png", "grid_dog.png", "grid_can.png"}
    assert len(list((out / "images/flat/dog").glob("p*.png"))) == 12
    results = json.loads((out / "results.json").read_text())
    assert results["runs"] == ["lora", "flat"] and results["baseline"] == "lora"
    assert results["metrics"] == ["dino", "clip_i", "clip_t", "pres", "div"]
    assert set(results["summary"]) == {"all", "objects", "live"}
    assert results["settings"]["adapters"]["flat"]["dog"]["rho"] == 0.05
    assert results["settings"]["models"]["dino"]["preprocess"]["crop"] == 224
    assert "image i of prompt p: 0 + p * 2 + i" in results["settings"]["protocol"]["seeds"]
    dog = next(s for s in results["subjects"] if s["run"] == "flat" and s["subject"] == "dog")
    assert dog["live"] is True and dog["class_noun"] == "dog" and dog["n_generated"] == 12
    assert dog["images"][0]["prompt"] == "a sks dog in the jungle"
    table = (out / "report.md").read_text()
    assert "| lora (baseline) | 2 |" in table and "Δ PRES" in table and "![Samples: dog](grid_dog.png)" in table

    # Resume: a deleted image is generated again, alone, with its own seed; nothing else is.
    victim = out / "images/lora/can/p03_001.png"
    before = Image.open(victim)
    before.load()
    victim.unlink()
    calls = []
    original = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    assert cli.main(argv) == 0
    assert "55 image(s) on disk, 1 to generate" in capsys.readouterr().out
    assert [(c.prompt, c.seed, c.num_images) for c in calls] == [("a sks can on a cobblestone street", 7, 1)]
    after = Image.open(victim)
    assert after.info == before.info  # same settings record
    # Same seed, same image; alone vs in a batch of 2, float rounding may move a pixel by one level.
    assert np.abs(np.asarray(after, dtype=int) - np.asarray(before, dtype=int)).max() <= 2
    again = json.loads((out / "results.json").read_text())
    for run, stats in results["summary"]["all"]["runs"].items():
        for metric, stat in stats.items():
            assert again["summary"]["all"]["runs"][run][metric]["mean"] == pytest.approx(stat["mean"], abs=1e-3)

    # Other settings on the same folder: refused, nothing regenerated.
    code = cli.main([*argv, "--steps", "3"])
    assert code == 2 and "generated with other settings" in capsys.readouterr().err


def test_runs_are_resolved_before_anything_loads(runs, tmp_path) -> None:
    resolved = resolve_runs([f"lora={runs['lora']}", str(runs["flat"] / "dog")], ["dog", "can"])
    assert resolved[0].adapters == {"dog": runs["lora"] / "dog", "can": runs["lora"] / "can"}
    assert resolved[1].name == "dog" and set(resolved[1].adapters.values()) == {runs["flat"] / "dog"}  # shared
    base = resolve_runs(["base=none"], ["dog", "can"])[0]  # the base model alone, as a run
    assert base.name == "base" and base.path is None and base.adapters == {"dog": None, "can": None}
    with pytest.raises(EvalError) as info:
        resolve_runs([f"a={runs['lora']}", f"a={runs['flat']}", str(tmp_path / "nope")], ["dog", "vase"])
    text = str(info.value)
    assert "run `a` has no adapter for subject `vase`" in text
    assert "two runs are named `a`" in text and "nope` does not exist" in text


def test_bad_input(tiny_sd_path, runs, dreambench_dir, tiny_clip_path, tiny_dino_path, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    argv = _argv(tiny_sd_path, runs, dreambench_dir, out, tiny_clip_path, tiny_dino_path)
    subjects = argv.index("--subjects")
    bad_subject = [*argv[: subjects + 1], "dog", "dog4", *argv[subjects + 3 :]]
    assert cli.main(bad_subject) == 2
    assert "Subject(s) `dog4` not in the DreamBench dataset" in capsys.readouterr().err
    assert cli.main([*argv, "--div", "--images_per_prompt", "1"]) == 2
    assert "`--div` compares images of the same prompt" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_dreambench_on_a_flux_base_and_a_cross_family_adapter(tiny_flux_path, tiny_sd3_path, dreambench_dir,
                                                              tiny_clip_path, tiny_dino_path, tmp_path, capsys,
                                                              one_thread) -> None:
    from conftest import save_random_adapter

    flux = save_random_adapter(tiny_flux_path, tmp_path / "runs" / "flux" / "dog")
    out = tmp_path / "eval"
    argv = ["dreambench", "--base", str(tiny_flux_path), "--adapters", f"flux={flux.parent}", "--dataset",
            str(dreambench_dir), "--subjects", "dog", "--images_per_prompt", "1", "--max_prompts", "2", "--steps", "2",
            "--width", "64", "--height", "64", "--guidance_scale", "3.5", "--out", str(out), "--dino_model",
            str(tiny_dino_path), "--clip_model", str(tiny_clip_path), "--device", "cpu"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["runs"] == ["flux"] and len(list((out / "images/flux/dog").glob("p*.png"))) == 2
    sd3 = save_random_adapter(tiny_sd3_path, tmp_path / "runs" / "sd3" / "dog")
    bad = [*argv[:4], f"sd3={sd3.parent}", *argv[5:]]
    bad[bad.index("--out") + 1] = str(tmp_path / "eval_bad")
    assert cli.main(bad) == 2
    assert "trained for SD3" in capsys.readouterr().err
