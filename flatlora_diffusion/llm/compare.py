"""LoRA vs Flat-LoRA on the toy Llama, over seeds, in-domain and out-of-domain, with error bars:

    python -m flatlora_diffusion.llm compare --seeds 0 1 2 --out runs/llm_compare [--max_steps N] [--test 200]

Under ``--out``: ``data/`` (the demo's training file, then three GSM8K-format test sets none of whose
questions is in it: ``in_domain`` — the training templates, numbers up to 9; ``ood_numbers`` — the
same templates with numbers 10 to 15; ``ood_templates`` — question templates seen neither in
fine-tuning nor in pretraining), ``runs/<method>-seed<k>/`` (one demo-config run each, ρ = 0 and
0.05, with ``scores.json``), and the report: ``results.json``, ``results.md``, ``comparison.png``.

The seed changes the LoRA initialisation and the data order; the data and the test sets stay
fixed, so LoRA and Flat-LoRA of one seed are a pair. Reported per method and test set: accuracy
mean ± s.e. over seeds; per test set: the paired Δ (Flat-LoRA − LoRA), mean ± s.e. over seeds.

Resumable: a run with ``scores.json`` is not redone, an unfinished one is trained again; a folder
made with other settings (``settings.json``) is refused, naming the difference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flatlora_diffusion.files import save_image, sha256_file, write_text
from flatlora_diffusion.llm import synthetic
from flatlora_diffusion.llm.config import LLMError
from flatlora_diffusion.llm.demo import DEMO_CONFIG, RUNS, score_gsm8k, train_run
from flatlora_diffusion.llm.train import local_model

TEST_SETS = {"in_domain": "In-domain", "ood_numbers": "OOD: numbers 10-15", "ood_templates": "OOD: unseen templates"}
CHART_LABELS = ("In-domain", "OOD numbers", "OOD templates")  # short enough for the bar groups
METHODS = {"lora": "LoRA", "flat_lora": "Flat-LoRA"}


def write_data(out: Path, n_train: int, n_test: int) -> dict[str, Path]:
    """The training file and the three test sets (seeded, disjoint from the training questions)."""
    train, in_domain = synthetic.write_splits(out, n_train, n_test, seed=0)
    seen = {json.loads(line)["question"] for line in train.read_text().splitlines()}
    low, high = synthetic.OOD_NUMBERS
    numbers = synthetic.make_problems(n_test, seed=2, min_number=low, max_number=high, exclude=seen)
    templates = synthetic.make_problems(n_test, seed=3, kinds=tuple(synthetic.UNSEEN_KINDS), exclude=seen)
    return {"train": train, "in_domain": in_domain,
            "ood_numbers": synthetic.write_jsonl(numbers, out / "ood_numbers.jsonl"),
            "ood_templates": synthetic.write_jsonl(templates, out / "ood_templates.jsonl")}


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "settings.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        differences = [f"`{k}` {previous.get(k)!r} there, {settings.get(k)!r} now" for k in sorted({*previous, *settings})
                       if k != "seeds" and previous.get(k) != settings.get(k)]
        if differences:
            raise LLMError(f"`--out` `{out}` holds a comparison made with other settings ({'; '.join(differences)}). "
                           "Use the same settings to resume it, or choose another `--out`.")
    write_text(path, json.dumps(settings, indent=2) + "\n")


def run_one(out: Path, method: str, seed: int, data: dict[str, Path], settings: dict) -> dict:
    """Train and score one (method, seed) run, or read its scores when it is finished."""
    run_dir = out / "runs" / f"{method}-seed{seed}"
    scores_file = run_dir / "scores.json"
    if scores_file.is_file():
        return json.loads(scores_file.read_text())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = train_run(run_dir, RUNS[method], seed, data["train"], model=settings["model"],
                        config_file=settings["config"], max_steps=settings["max_steps"])
    accuracy = {}
    for name in TEST_SETS:
        scored = score_gsm8k(settings["model"], summary["adapter"], data[name], run_dir / f"{name}.json",
                             device="cpu", dtype="float32", batch_size=50, max_new_tokens=48)
        accuracy[name] = scored["accuracy"]
    scores = {"method": method, "rho": RUNS[method], "seed": seed, "accuracy": accuracy,
              "train_loss": summary["train_loss"], "eval_loss": summary["eval_loss"], "steps": summary["global_step"],
              "cpu_seconds": round(time.process_time() - cpu0, 1), "wall_seconds": round(time.perf_counter() - wall0, 1)}
    write_text(scores_file, json.dumps(scores, indent=2) + "\n")
    return scores


def summarise(scores: list[dict]) -> dict:
    """Per method and test set: mean ± s.e. over seeds; per test set: the paired Δ (Flat-LoRA − LoRA)."""
    from eval.report import Stat

    by = {(s["method"], s["seed"]): s for s in scores}
    seeds = sorted({s["seed"] for s in scores if all((m, s["seed"]) in by for m in METHODS)})
    table: dict = {"seeds": seeds, "methods": {}, "delta": {}}
    for method in METHODS:
        table["methods"][method] = {name: Stat.of([by[method, k]["accuracy"][name] for k in seeds]).to_dict()
                                    for name in TEST_SETS}
        table["methods"][method]["eval_loss"] = Stat.of([by[method, k]["eval_loss"] for k in seeds]).to_dict()
    for name in TEST_SETS:
        diffs = [by["flat_lora", k]["accuracy"][name] - by["lora", k]["accuracy"][name] for k in seeds]
        table["delta"][name] = {**Stat.of(diffs).to_dict(), "per_seed": diffs}
    return table


def _fmt(stat: dict, signed: bool = False) -> str:
    mean = f"{100 * stat['mean']:+.1f}" if signed else f"{100 * stat['mean']:.1f}"
    return mean if stat["sem"] is None else f"{mean} ± {100 * stat['sem']:.1f}"


def markdown(table: dict, n_test: int, cpu_seconds: float) -> str:
    """The report table: accuracy (%) mean ± s.e. over seeds, and the paired Δ in points."""
    n = len(table["seeds"])
    lines = [f"GSM8K-format accuracy (%) of `toy:llama` + adapter, mean ± s.e. over n = {n} seeds "
             f"({', '.join(map(str, table['seeds']))}), {n_test} problems per test set; Δ = Flat-LoRA − LoRA, "
             "paired by seed, in points.", "",
             "| Test set | LoRA (ρ = 0) | Flat-LoRA (ρ = 0.05) | Δ (paired) |", "|---|---|---|---|"]
    for name, label in TEST_SETS.items():
        lines.append(f"| {label} | {_fmt(table['methods']['lora'][name])} | "
                     f"{_fmt(table['methods']['flat_lora'][name])} | {_fmt(table['delta'][name], signed=True)} |")
    losses = [table["methods"][m]["eval_loss"] for m in METHODS]
    lines += ["", f"Held-out loss (the demo's 64 training-format problems): LoRA {losses[0]['mean']:.4f}, "
              f"Flat-LoRA {losses[1]['mean']:.4f}. CPU time of the runs: {cpu_seconds / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def compare(out_dir: str | Path, seeds: list[int], *, max_steps: int | None = None, n_train: int = 2000,
            n_test: int = 200, model: str = "toy:llama", config_file: str | Path = DEMO_CONFIG) -> dict:
    """Run (or resume) every (method, seed) run into `out_dir` and write the report; return `results.json`."""
    from eval.charts import bar_chart
    from eval.environment import environment
    from eval.report import Stat

    if not seeds or len(set(seeds)) != len(seeds):
        raise LLMError(f"`--seeds` must be distinct seeds, at least one, got {seeds}.")
    if n_test < 1 or n_train < 80 or (max_steps is not None and max_steps < 1):
        raise LLMError(f"`--test` must be >= 1, `--train` >= 80 and `--max_steps` >= 1; got {n_test}, {n_train}, "
                       f"{max_steps}.")
    out = Path(out_dir)
    weights = Path(local_model(model, "--model")) / "model.safetensors"
    settings = {"model": model, "model_sha256": sha256_file(weights) if weights.is_file() else None,
                "config": str(config_file), "config_sha256": sha256_file(config_file), "max_steps": max_steps,
                "n_train": n_train, "n_test": n_test, "rho": RUNS}
    _check_settings(out, settings)
    data = write_data(out / "data", n_train, n_test)
    scores = []
    for seed in seeds:
        for method in METHODS:
            print(f"[compare] {method} seed {seed}", flush=True)
            scores.append(run_one(out, method, seed, data, settings))
    table = summarise(scores)
    cpu_seconds = sum(s["cpu_seconds"] for s in scores)
    results = {**table, "runs": scores, "settings": settings, "cpu_seconds": round(cpu_seconds, 1),
               "environment": environment()}
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "results.md", markdown(table, n_test, cpu_seconds))
    by = {(s["method"], s["seed"]): s for s in scores}
    series = {label: {name: Stat.of([by[m, k]["accuracy"][name] for k in table["seeds"]]) for name in TEST_SETS}
              for m, label in METHODS.items()}
    chart = bar_chart(series, list(CHART_LABELS), list(TEST_SETS),
                      title=f"toy:llama GSM8K-format accuracy, mean ± s.e. over {len(table['seeds'])} seeds")
    save_image(chart, out / "comparison.png")
    return results
