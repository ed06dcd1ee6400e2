"""Run a ρ sweep: train every missing run, score all runs on the DreamBench protocol, measure flatness.

Each step is a subprocess of a public command (the trainer, `python -m eval dreambench`,
`python -m flatlora_diffusion.flatness`), so the sweep runs a real model exactly as a user would, and
each step skips what is already on disk: a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from flatlora_diffusion.sweep.plan import (
    RunKey,
    Subject,
    SweepConfig,
    SweepError,
    run_differences,
    train_flags,
)

logger = logging.getLogger(__name__)
ADAPTER_INFO, CARD = "adapter_info.json", "README.md"


def run_command(command: list[str], log: Path) -> None:
    """Run one step with one CPU thread per process; its output goes to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SweepError(f"`{' '.join(command)}` failed (exit {result.returncode}); its log `{log}` ends:\n{tail}")


def finished(run_dir: Path) -> bool:
    """Whether the trainer finished this run: its model card (the last file it writes) and adapter info exist."""
    return (run_dir / CARD).is_file() and (run_dir / ADAPTER_INFO).is_file()


def train_time(run_dir: Path) -> float | None:
    """Wall seconds of the trainer process that finished the run (`.SUBJECT.seconds.json` beside it, written by
    the sweep; a run resumed after a kill counts only its last part)."""
    path = run_dir.parent / f".{run_dir.name}.seconds.json"
    return json.loads(path.read_text())["seconds"] if path.is_file() else None


def _train(config: SweepConfig, key: RunKey, subject: Subject) -> None:
    from flatlora_diffusion.files import write_text

    run_dir = config.run_dir(key)
    start = time.perf_counter()
    run_command([sys.executable, "-m", "flatlora_diffusion.dreambooth", *train_flags(config, key, subject)],
                config.out / "logs" / "train" / f"{key.group}_{key.subject}.log")
    seconds = time.perf_counter() - start
    write_text(run_dir.parent / f".{run_dir.name}.seconds.json", json.dumps({"seconds": round(seconds, 1)}) + "\n")


def train_all(config: SweepConfig, subjects: list[Subject], progress=None) -> list[RunKey]:
    """Train every run of the grid that is not finished; refuse runs on disk made with other settings."""
    by_name = {s.name: s for s in subjects}
    todo, errors = [], []
    for key in config.grid():
        flags = train_flags(config, key, by_name[key.subject])
        differences = run_differences(config.run_dir(key), flags)
        if differences:
            errors.append(f"`{config.run_dir(key)}`: " + "; ".join(differences))
        elif not finished(config.run_dir(key)):
            todo.append(key)
    if errors:
        raise SweepError("Runs on disk were made with other settings; remove them or use another `--out`:\n  - "
                         + "\n  - ".join(errors))
    order = {s.name: i for i, s in enumerate(subjects)}
    todo.sort(key=lambda k: (k.seed, order[k.subject], k.rho))  # complete paired sets first
    logger.info("%d of %d runs to train.", len(todo), len(config.grid()))
    with ThreadPoolExecutor(max_workers=config.jobs) as pool:
        futures = [pool.submit(_train, config, key, by_name[key.subject]) for key in todo]
        for future in futures:
            future.result()
            if progress is not None:
                progress.update(1)
    return todo


def trainer_values(config: SweepConfig, subjects: list[Subject]) -> dict:
    """The resolved trainer flags of the sweep's first run; bad trainer flags are refused here, before any work."""
    from flatlora_diffusion.dreambooth import ConfigError, load_config

    key = config.grid()[0]
    try:
        return load_config(train_flags(config, key, next(s for s in subjects if s.name == key.subject))).to_flags()
    except ConfigError as err:
        raise SweepError(f"The trainer refuses the sweep's settings (`--config {config.config}` and the flags "
                         f"after `--`): {err}") from None


def evaluate(config: SweepConfig, root: Path, subjects: list[Subject]) -> dict:
    """Score every (ρ, seed) run and the base model with `python -m eval dreambench` in one call, so every
    run gets images of the same prompts and seeds (it generates only missing images: resumable)."""
    # The first run's resolved `config.yaml`: the settings the trainer filled from the model family
    # (e.g. the validation guidance) are there, not in the flags.
    values = yaml.safe_load((config.run_dir(config.grid()[0]) / "config.yaml").read_text())
    runs = ["base=none"] + [f"rho{r:g}-seed{s}={config.group_dir(r, s)}" for r in config.rhos for s in config.seeds]
    command = [sys.executable, "-m", "eval", "dreambench", "--base", values["pretrained_model_name_or_path"],
               "--adapters", *runs, "--dataset", str(root), "--subjects", *[s.name for s in subjects],
               "--out", str(config.out / "eval"), "--images_per_prompt", str(config.images_per_prompt),
               "--seed", str(config.eval_seed), "--steps", str(values["validation_num_inference_steps"]),
               "--guidance_scale", str(values["validation_guidance_scale"]), "--dino_model", config.dino_model,
               "--clip_model", config.clip_model, "--device", config.device, "--gen_batch_size", "16",
               "--pres", "--baseline", runs[1].split("=")[0]] + (["--div"] if config.images_per_prompt > 1 else [])
    if config.max_prompts is not None:
        command += ["--max_prompts", str(config.max_prompts)]
    run_command(command, config.out / "logs" / "eval.log")
    return json.loads((config.out / "eval" / "results.json").read_text())


def toy_subjects(subjects: list[Subject]) -> dict | None:
    """The toy world's subjects when every sweep subject is one (the oracle can read them), else None."""
    from flatlora_diffusion.toyworld.subjects import SUBJECTS_BY_NAME

    if all(s.name in SUBJECTS_BY_NAME for s in subjects):
        return {s.name: SUBJECTS_BY_NAME[s.name] for s in subjects}
    return None


def oracle_scores(results: dict, toy: dict) -> dict[tuple[str, str], dict]:
    """(eval run, subject) → the oracle's subject/scene accuracy on that run's generated images."""
    from flatlora_diffusion.model_ids import resolve_model_id
    from flatlora_diffusion.toyworld.oracle import load_oracle
    from flatlora_diffusion.toyworld.quality import score_image_files

    oracle = load_oracle(resolve_model_id("toy:oracle"))
    scores = {}
    for row in results["subjects"]:
        images = row.get("images") or []
        if images:
            read = score_image_files(oracle, toy[row["subject"]], [i["file"] for i in images], [i["prompt"] for i in images])
            scores[(row["run"], row["subject"])] = {f"oracle_{k}": v["accuracy"] for k, v in read.items()}
    return scores


def flatness(config: SweepConfig, subjects: list[Subject]) -> dict[tuple[str, str], dict]:
    """Run the flatness meter once per subject on all of its adapters (again when the adapters or the
    meter's settings changed); (eval run, subject) → its loss L(0) and sharpness E L(r) − L(0) per radius."""
    from flatlora_diffusion.files import write_text

    values = trainer_values(config, subjects)
    found = {}
    for subject in subjects:
        out = config.out / "flatness" / subject.name
        keys = [k for k in config.grid() if k.subject == subject.name]  # ρ = 0 first: the meter's paired reference
        names = {k.group.replace(".", "p"): k.group for k in keys}  # adapter names allow no `.`
        adapters = [f"{k.group.replace('.', 'p')}={config.run_dir(k)}" for k in keys]
        result_file, request_file = out / "flatness.json", out / "sweep_request.json"
        request = {"adapters": adapters, "radii": config.radii, "draws": config.draws,
                   "directions": config.directions, "seed": config.eval_seed}
        done = result_file.is_file() and request_file.is_file() and json.loads(request_file.read_text()) == request
        if not done:
            run_command([sys.executable, "-m", "flatlora_diffusion.flatness", "--base",
                         values["pretrained_model_name_or_path"], "--adapters", *adapters, "--data", str(subject.folder),
                         "--prompt", subject.instance_prompt, "--radii", ",".join(f"{r:g}" for r in config.radii),
                         "--draws", str(config.draws), "--directions", str(config.directions),
                         "--seed", str(config.eval_seed), "--device", config.device, "--out", str(out)],
                        config.out / "logs" / f"flatness_{subject.name}.log")
            write_text(request_file, json.dumps(request, indent=1) + "\n")
        for name, measured in json.loads(result_file.read_text())["adapters"].items():
            found[(names[name], subject.name)] = {"flat_loss": measured["loss"]} | {
                f"sharpness@{r}": v["sharpness"] for r, v in measured["expected"].items() if float(r) > 0}
    return found


def collect(config: SweepConfig, results: dict, extra: dict[tuple[str, str], dict]) -> tuple[list[dict], list[dict]]:
    """One row per (ρ, seed, subject) run and one per subject for the base model: eval metrics, oracle and
    flatness figures, training time."""
    scored = {(r["run"], r["subject"]): r for r in results["subjects"]}
    metrics = [m for m in results["metrics"]]

    def row(run: str, subject: str) -> dict:
        found = scored.get((run, subject), {})
        return {m: found.get(m) for m in metrics} | extra.get((run, subject), {})

    rows = [{"rho": k.rho, "seed": k.seed, "subject": k.subject, **row(k.group, k.subject),
             "train_seconds": train_time(config.run_dir(k))} for k in config.grid()]
    base = [{"subject": s, **row("base", s)} for s in sorted({k.subject for k in config.grid()})]
    return rows, base


def image_grid_rows(config: SweepConfig, results: dict, prompt_index: int = 0) -> tuple[list, list[str]]:
    """Rows = subjects, columns = base + each ρ: image 0 of prompt `prompt_index`, the first training seed's runs."""
    files = {(r["run"], r["subject"]): [i["file"] for i in r.get("images") or []] for r in results["subjects"]}
    seed = config.seeds[0]
    runs = ["base"] + [RunKey(rho, seed, "").group for rho in config.rhos]
    columns = ["base model"] + [f"rho = {rho:g}" for rho in config.rhos]  # the charts' font has no Greek
    index = prompt_index * config.images_per_prompt
    rows = []
    for subject in [s.name for s in config.subjects]:
        cells = [files.get((run, subject), [None] * (index + 1))[index] for run in runs]
        prompt = next((i["prompt"] for r in results["subjects"] if r["subject"] == subject
                       for i in (r.get("images") or [])[index:index + 1]), subject)
        rows.append((prompt, cells))
    return rows, columns


def run_sweep(config: SweepConfig) -> dict:
    """Train, score, measure and report; every step resumes from what is on disk."""
    from tqdm.auto import tqdm

    from flatlora_diffusion.sweep.plan import check_settings, describe, resolve_subjects
    from flatlora_diffusion.sweep.report import write_report

    root, subjects = resolve_subjects(config.subjects)
    trainer_values(config, subjects)
    check_settings(config)
    start = time.perf_counter()
    done = sum(finished(config.run_dir(k)) for k in config.grid())
    with tqdm(total=len(config.grid()), initial=done, desc="sweep: training runs", unit="run") as progress:
        train_all(config, subjects, progress)  # the ETA counts only runs trained now
    results = evaluate(config, root, subjects)
    extra: dict[tuple[str, str], dict] = {}
    toy = toy_subjects(subjects) if config.oracle == "auto" else None
    if toy is not None:
        extra = oracle_scores(results, toy)
    if config.flatness:
        for key, values in flatness(config, subjects).items():
            extra.setdefault(key, {}).update(values)
    rows, base_rows = collect(config, results, extra)
    grid_rows, grid_columns = image_grid_rows(config, results)
    settings = describe(config) | {"dataset": str(root), "oracle_used": toy is not None,
                                   "seconds_this_start": round(time.perf_counter() - start, 1)}
    summary = write_report(config.out, rows, base_rows, config.rhos, settings, grid_rows, grid_columns)
    return summary
