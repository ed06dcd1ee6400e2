"""The ρ sweep: its statistics, resuming after a kill, refusing mixed settings, bad input, and one whole run."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatlora_diffusion.sweep import SweepConfig, SweepError, runner
from flatlora_diffusion.sweep.plan import check_settings, resolve_subjects, train_flags
from flatlora_diffusion.sweep.report import summarise, write_report

REPO = Path(__file__).resolve().parents[1]
TOY_IMAGES = REPO / "flatlora_diffusion" / "data" / "toy_dreambench" / "images"
BASE_YAML = """pretrained_model_name_or_path: {model}
resolution: 32
rank: 2
train_batch_size: 1
max_train_steps: 6
learning_rate: 1.0e-3
checkpointing_steps: 1
validation_num_inference_steps: 2
validation_guidance_scale: 2.0
"""


@pytest.fixture
def base_yaml(tmp_path: Path, tiny_sd_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(BASE_YAML.format(model=tiny_sd_path))
    return path


def _config(base_yaml: Path, out: Path, **kwargs) -> SweepConfig:
    settings = {"rhos": [0.0, 0.1], "seeds": [0], "subjects": [TOY_IMAGES / "redblue_ball"]} | kwargs
    return SweepConfig(config=base_yaml, out=out, **settings)


def test_the_reports_paired_difference_and_standard_errors_match_an_independent_computation(tmp_path: Path):
    dino = {(0.0, "a", 0): 0.30, (0.0, "a", 1): 0.34, (0.0, "b", 0): 0.50, (0.0, "b", 1): 0.41,
            (0.1, "a", 0): 0.33, (0.1, "a", 1): 0.35, (0.1, "b", 0): 0.56, (0.1, "b", 1): 0.40}
    rows = [{"rho": r, "subject": s, "seed": k, "dino": v} for (r, s, k), v in dino.items()]
    summary = summarise(rows, [0.0, 0.1])
    lora = [dino[(0.0, s, k)] for s in "ab" for k in (0, 1)]
    flat = [dino[(0.1, s, k)] for s in "ab" for k in (0, 1)]
    differences = [f - b for f, b in zip(flat, lora, strict=True)]
    assert summary["per_rho"][0.0]["dino"].mean == pytest.approx(statistics.mean(lora))
    assert summary["per_rho"][0.0]["dino"].sem == pytest.approx(statistics.stdev(lora) / 2)
    assert summary["delta"][0.1]["dino"].mean == pytest.approx(statistics.mean(differences))  # 0.0225
    assert summary["delta"][0.1]["dino"].sem == pytest.approx(statistics.stdev(differences) / 2)
    assert summary["delta"][0.1]["dino"].n == 4
    write_report(tmp_path, rows, [], [0.0, 0.1], {"config": "x.yaml", "train_args": []})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["delta_vs_rho0"]["0.1"]["dino"]["mean"] == pytest.approx(0.0225)
    assert "0.023 ± " in (tmp_path / "report.md").read_text()


def test_a_paired_difference_uses_only_units_present_in_both_runs():
    rows = [{"rho": 0.0, "subject": "a", "seed": 0, "dino": 0.2}, {"rho": 0.0, "subject": "a", "seed": 1, "dino": 0.4},
            {"rho": 0.1, "subject": "a", "seed": 0, "dino": 0.5}]
    delta = summarise(rows, [0.0, 0.1])["delta"][0.1]["dino"]
    assert (delta.mean, delta.n) == (pytest.approx(0.3), 1)


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}


def test_a_killed_sweep_resumes_without_retraining_finished_runs(tmp_path: Path, base_yaml: Path, monkeypatch):
    config = _config(base_yaml, tmp_path / "sweep")
    first = config.run_dir(config.grid()[0])
    script = ("import sys; from pathlib import Path; from flatlora_diffusion.sweep import SweepConfig;"
              "from flatlora_diffusion.sweep.plan import resolve_subjects; from flatlora_diffusion.sweep.runner import train_all;"
              f"c = SweepConfig(config=Path({str(base_yaml)!r}), out=Path({str(config.out)!r}), rhos=[0.0, 0.1], seeds=[0],"
              f"subjects=[Path({str(TOY_IMAGES / 'redblue_ball')!r})]); train_all(c, resolve_subjects(c.subjects)[1])")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not runner.finished(first) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and the trainer it runs
    process.wait()
    assert runner.finished(first), "the first run should have finished before the kill"
    before = _mtimes(first)

    commands = []
    real = runner.run_command
    monkeypatch.setattr(runner, "run_command", lambda command, log: (commands.append(command), real(command, log)))
    trained = runner.train_all(config, resolve_subjects(config.subjects)[1])
    assert [k.rho for k in trained] in ([0.1], [])  # only the unfinished run, if the kill came before it ended
    assert len(commands) == len(trained)
    assert _mtimes(first) == before
    assert all(runner.finished(config.run_dir(k)) for k in config.grid())
    assert runner.train_all(config, resolve_subjects(config.subjects)[1]) == []
    saved = (first / "config.yaml").read_text()
    assert "num_train_epochs: 2" in saved  # derived by the trainer (6 steps, 5 images), not a difference


def test_a_sweep_with_other_shared_settings_is_refused_naming_the_difference(tmp_path: Path, base_yaml: Path):
    check_settings(_config(base_yaml, tmp_path / "sweep"))
    check_settings(_config(base_yaml, tmp_path / "sweep", rhos=[0.0, 0.05, 0.1], seeds=[0, 1]))  # the grid may grow
    with pytest.raises(SweepError, match="images_per_prompt.*4 before, 2 now"):
        check_settings(_config(base_yaml, tmp_path / "sweep", images_per_prompt=2))
    with pytest.raises(SweepError, match="train_args"):
        check_settings(_config(base_yaml, tmp_path / "sweep", train_args=["--max_train_steps", "8"]))


def test_a_run_on_disk_made_with_other_trainer_settings_is_refused_before_any_training(tmp_path: Path, base_yaml: Path,
                                                                                       monkeypatch):
    from flatlora_diffusion.dreambooth import load_config

    config = _config(base_yaml, tmp_path / "sweep")
    _, subjects = resolve_subjects(config.subjects)
    key = config.grid()[1]
    config.run_dir(key).mkdir(parents=True)
    load_config(train_flags(config, key, subjects[0]) + ["--learning_rate", "0.5"]).save_yaml(
        config.run_dir(key) / "config.yaml")
    monkeypatch.setattr(runner, "run_command", lambda *a: pytest.fail("nothing may train"))
    with pytest.raises(SweepError, match=r"rho=0.1.*`learning_rate`: 0.5 in the run, 0.001 in this sweep"):
        runner.train_all(config, subjects)


def test_bad_sweep_input_is_refused_with_the_flag_named(tmp_path: Path, base_yaml: Path):
    with pytest.raises(SweepError, match=r"`--rho` must lie in \[0, 1\]"):
        _config(base_yaml, tmp_path, rhos=[0.0, 1.5])
    with pytest.raises(SweepError, match="`--rho` is set by the sweep"):
        _config(base_yaml, tmp_path, train_args=["--rho", "0.3"])
    with pytest.raises(SweepError, match="`--config`"):
        _config(tmp_path / "missing.yaml", tmp_path)
    dataset = tmp_path / "bench"
    (dataset / "images" / "dog").mkdir(parents=True)
    (dataset / "images" / "cat").mkdir(parents=True)
    (dataset / "images" / "cat" / "00.png").write_bytes((TOY_IMAGES / "redblue_ball" / "00.png").read_bytes())
    toy_prompts = (TOY_IMAGES.parent / "prompts_and_classes.txt").read_text()
    (dataset / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\ndog,dog\n\n" + toy_prompts[toy_prompts.index("Prompts"):])
    with pytest.raises(SweepError, match="`--subjects` cat are not listed"):
        resolve_subjects([dataset / "images" / "cat"])
    with pytest.raises(SweepError, match="holds no images"):
        resolve_subjects([dataset / "images" / "dog"])
    with pytest.raises(SweepError, match="not inside a DreamBench-layout dataset"):
        resolve_subjects([tmp_path])
    with pytest.raises(SweepError, match="from 2 datasets"):
        resolve_subjects([dataset / "images" / "dog", TOY_IMAGES / "redblue_ball"])


def test_a_whole_sweep_on_the_toy_world_writes_its_report(tmp_path: Path, base_yaml: Path, tiny_dino_path: Path,
                                                          tiny_clip_path: Path, single_thread):
    from flatlora_diffusion.sweep.__main__ import main

    out = tmp_path / "sweep"
    code = main(["--config", str(base_yaml), "--rho", "0", "0.1", "--seeds", "0", "--subjects",
                 str(TOY_IMAGES / "redblue_ball"), "--out", str(out), "--max_prompts", "2", "--images_per_prompt", "1",
                 "--dino_model", str(tiny_dino_path), "--clip_model", str(tiny_clip_path), "--device", "cpu",
                 "--draws", "2", "--directions", "1", "--radii", "0,0.1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["rho"] for r in report["runs"]] == [0.0, 0.1]
    assert all(0 <= r["oracle_scene"] <= 1 and r["dino"] is not None for r in report["runs"])  # the oracle read them
    eval_settings = json.loads((out / "eval" / "results.json").read_text())["settings"]["config"]
    assert eval_settings["seed"] == 0 and eval_settings["images_per_prompt"] == 1
    assert all(r["sharpness@0.1"] is not None and r["flat_loss"] > 0 for r in report["runs"])  # the meter ran
    assert (out / "grid.png").is_file() and (out / "metrics.png").is_file() and (out / "sharpness.png").is_file()
    assert "Flat-LoRA ρ = 0.1" in (out / "report.md").read_text()
