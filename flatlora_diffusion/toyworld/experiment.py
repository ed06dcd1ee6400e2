"""DreamBooth before/after on the toy world: base vs LoRA vs Flat-LoRA, with and without prior preservation.

    python -m flatlora_diffusion.toyworld dreambooth OUT_DIR [--subjects ...] [--variants ...] [--jobs 2]

Every (subject, variant) is trained with the DreamBooth trainer from `configs/demo.yaml` plus the
variant's flags, then scored with `toyworld.quality.subject_fidelity` (the oracle); the base model is
scored once per subject with the same prompts and seeds. Runs whose result file exists are skipped,
so a killed experiment resumes. Writes ``OUT_DIR/results.json`` and ``OUT_DIR/table.md``.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flatlora_diffusion.files import write_text
from flatlora_diffusion.stats import mean_sem
from flatlora_diffusion.sweep.runner import run_command
from flatlora_diffusion.toyworld.quality import instance_prompt
from flatlora_diffusion.toyworld.subjects import SUBJECTS, SUBJECTS_BY_NAME

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
SUBJECTS_DIR = Path(__file__).resolve().parents[1] / "data" / "toy_dreambench"
VARIANTS: dict[str, list[str]] = {
    "lora": ["--rho", "0"],
    "flat": [],  # the demo's Flat-LoRA settings
    "lora_prior": ["--rho", "0", "--with_prior_preservation", "--num_class_images", "50"],
    "flat_prior": ["--with_prior_preservation", "--num_class_images", "50"],
}
METRICS = (("instance_prompt", "subject"), ("scene_prompts", "subject"), ("scene_prompts", "scene"),
           ("scene_prompts", "scene_and_subject"))


def _train_flags(subject_name: str, variant: str, run_dir: Path, config: Path) -> list[str]:
    subject = SUBJECTS_BY_NAME[subject_name]
    flags = ["--config", str(config), "--output_dir", str(run_dir / "adapter"),
             "--instance_data_dir", str(SUBJECTS_DIR / "images" / subject.name),
             "--instance_prompt", instance_prompt(subject), "--report_to", "none",
             "--validation_prompt", "none", "--validation_extra_prompts", "", *VARIANTS[variant]]
    if "--with_prior_preservation" in flags:
        flags += ["--class_data_dir", str(run_dir / "class_images"), "--class_prompt", f"a photo of a {subject.object}"]
    return flags


def _job(out: Path, subject: str, variant: str, base: str, config: Path, images_per_prompt: int) -> None:
    run_dir = out / "runs" / subject / variant
    if (run_dir / "subject.json").is_file():
        return
    evaluate = [sys.executable, "-m", "flatlora_diffusion.toyworld", "subject", str(run_dir), "--subject", subject,
                "--base", base, "--images_per_prompt", str(images_per_prompt)]
    if variant != "base":
        if not (run_dir / "adapter" / "pytorch_lora_weights.safetensors").is_file():
            run_command([sys.executable, "-m", "flatlora_diffusion.dreambooth", *_train_flags(subject, variant, run_dir, config)],
                        run_dir / "train.log")
        evaluate += ["--adapter", str(run_dir / "adapter")]
    run_command(evaluate, run_dir / "eval.log")


def table(out: Path, subjects: list[str], variants: list[str]) -> str:
    """The Markdown table: mean ± s.e. over subjects of each oracle metric, per variant."""
    rows = ["| run | subjects | instance prompt: subject | scene prompts: subject | scene | scene and subject |",
            "|---|---|---|---|---|---|"]
    ceiling = [json.loads((out / "runs" / s / "base" / "subject.json").read_text())["reconstruction_ceiling"]["accuracy"]
               for s in subjects]
    results = {}
    for variant in ["base", *variants]:
        per_subject = [json.loads((out / "runs" / s / variant / "subject.json").read_text()) for s in subjects]
        results[variant] = per_subject
        cells = []
        for group, metric in METRICS:
            estimate = mean_sem([r[group][metric]["accuracy"] for r in per_subject])
            mean, se = estimate.mean, (0.0 if estimate.n < 2 else estimate.sem)
            cells.append(f"{mean:.2f} ± {se:.2f}")
        rows.append(f"| {variant} | {len(subjects)} | " + " | ".join(cells) + " |")
    estimate = mean_sem(ceiling)
    mean, se = estimate.mean, (0.0 if estimate.n < 2 else estimate.sem)
    rows.append(f"| VAE round trip of renders (ceiling) | {len(subjects)} | {mean:.2f} ± {se:.2f} | | | |")
    per_subject = ["", "| subject | VAE ceiling | " + " | ".join(f"{v}: instance / scene and subject" for v in ["base", *variants]) + " |",
                   "|---|---|" + "---|" * (1 + len(variants))]
    for i, name in enumerate(subjects):
        cells = [f"{r[i]['instance_prompt']['subject']['accuracy']:.2f} / {r[i]['scene_prompts']['scene_and_subject']['accuracy']:.2f}"
                 for r in results.values()]
        per_subject.append(f"| {name} | {ceiling[i]:.2f} | " + " | ".join(cells) + " |")
    write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    return "\n".join(rows + per_subject) + "\n"


def run_experiment(out_dir: str | Path, subjects: list[str] | None = None, variants: list[str] | None = None, *,
                   base: str = "toy:sd", config: str | Path = DEMO_CONFIG, jobs: int = 1,
                   images_per_prompt: int = 4) -> str:
    """Train and score every (subject, variant) not done yet; write and return the table."""
    out = Path(out_dir)
    subjects = subjects or [s.name for s in SUBJECTS]
    variants = variants or list(VARIANTS)
    unknown = [s for s in subjects if s not in SUBJECTS_BY_NAME] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown subject(s)/variant(s) {', '.join(unknown)}; subjects: "
                         f"{', '.join(SUBJECTS_BY_NAME)}; variants: {', '.join(VARIANTS)}.")
    work = [(s, v) for s in subjects for v in ["base", *variants]]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(_job, out, s, v, base, Path(config), images_per_prompt) for s, v in work]:
            future.result()
    text = table(out, subjects, variants)
    write_text(out / "table.md", text)
    return text
