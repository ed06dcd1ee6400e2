"""Offline end-to-end demo: LoRA vs Flat-LoRA on the toy Llama, scored with the GSM8K evaluator.

    python -m flatlora_diffusion.llm demo --out runs/llm_demo

Steps, all under ``--out``: write the synthetic arithmetic word problems (``data/train.jsonl``,
``data/test.jsonl``, GSM8K format), train LoRA (ρ = 0) and Flat-LoRA (ρ = 0.05) on ``toy:llama``
(pretrained on arithmetic in other formats, `flatlora_diffusion.llm.pretrain`) with the same seed
from ``configs/llm_demo.yaml`` (``runs/lora``, ``runs/flat_lora``), score each adapter with
``eval.gsm8k`` (zero-shot, greedy), and write ``results.json`` (atomically) with, per run, ``rho``,
``train_loss``, ``eval_loss`` and ``gsm8k_accuracy`` (a fraction in [0, 1]).

One seed and 100 test problems: the demo shows the pipeline learning, not whether Flat-LoRA helps;
``python -m flatlora_diffusion.llm compare`` answers that (seeds, error bars, out-of-domain tests).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from flatlora_diffusion.files import write_text
from flatlora_diffusion.llm.config import LLMError, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llm_demo.yaml"
RUNS = {"lora": 0.0, "flat_lora": 0.05}  # run name → ρ


def score_gsm8k(model: str | Path, adapter: str | Path, data: str | Path, out: str | Path | None = None,
                **settings) -> dict:
    """GSM8K accuracy of `model` + `adapter` on the JSONL `data`, through `eval.gsm8k` (no second scorer)."""
    from eval.config import GSM8KConfig
    from eval.gsm8k import evaluate, load_examples
    from eval.llm import load_causal_lm

    config = GSM8KConfig(model=str(model), adapter=str(adapter), data=str(data), **settings)
    examples, fewshot = load_examples(config)
    lm, tokenizer = load_causal_lm(config)
    result = evaluate(lm, tokenizer, examples, config, fewshot)
    if out is not None:
        records = result["records"]
        write_text(Path(out).with_suffix(".samples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
        write_text(out, json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2) + "\n")
    return result


def train_run(run_dir: str | Path, rho: float, seed: int, train_file: str | Path, *, model: str | Path | None = None,
              config_file: str | Path = DEMO_CONFIG, max_steps: int | None = None, n_eval: int | None = None) -> dict:
    """Train one demo-config run (ρ = `rho`) into a fresh `run_dir`; return the recipe's summary.

    `model` overrides the config's `model.name_or_path`, `n_eval` its `data.num_eval`.
    """
    from flatlora_diffusion.llm.train import run

    if not Path(config_file).is_file():
        raise LLMError(f"Demo config `{config_file}` not found; run from a source checkout (`pip install -e .`).")
    shutil.rmtree(run_dir, ignore_errors=True)  # the run's own folder: start fresh
    overrides = ["--config", str(config_file), "--data.train", str(train_file), "--training.output_dir", str(run_dir),
                 "--flat_lora.rho", str(rho), "--training.seed", str(seed)]
    if model is not None:
        overrides += ["--model.name_or_path", str(model)]
    if n_eval is not None:
        overrides += ["--data.num_eval", str(n_eval)]
    if max_steps is not None:
        overrides += ["--training.max_steps", str(max_steps), "--training.eval_steps", str(max(1, max_steps // 2))]
    return run(load_config(overrides))


def run_demo(out_dir: str | Path, *, max_steps: int | None = None, n_train: int = 2000, n_test: int = 100,
             n_eval: int | None = None, seed: int = 0, config_file: str | Path = DEMO_CONFIG,
             model: str | Path | None = None, max_new_tokens: int = 48) -> dict:
    """Run the demo into `out_dir` and return the content of `results.json`.

    `n_train` problems are written to the training file, of which `n_eval` (default: the config's
    `data.num_eval`) are held out for the evaluation loss; `n_test` are scored with the GSM8K evaluator.
    `model` replaces the config's base (``toy:llama``).
    """
    from eval.environment import environment
    from flatlora_diffusion.llm.synthetic import write_splits

    if not Path(config_file).is_file():
        raise LLMError(f"Demo config `{config_file}` not found; run from a source checkout (`pip install -e .`).")
    start = time.perf_counter()
    out = Path(out_dir)
    model = str(model or load_config(["--config", str(config_file)]).model.name_or_path)
    train_file, test_file = write_splits(out / "data", n_train, n_test, seed=seed)
    runs = {}
    for name, rho in RUNS.items():
        run_dir = out / "runs" / name
        summary = train_run(run_dir, rho, seed, train_file, model=model, config_file=config_file,
                            max_steps=max_steps, n_eval=n_eval)
        scored = score_gsm8k(model, summary["adapter"], test_file, run_dir / "gsm8k.json", device="cpu",
                             dtype="float32", batch_size=50, max_new_tokens=max_new_tokens)
        runs[name] = {"rho": rho, "train_loss": summary["train_loss"], "eval_loss": summary["eval_loss"],
                      "gsm8k_accuracy": scored["accuracy"], "gsm8k_correct": scored["correct"],
                      "gsm8k_n": scored["n"], "gsm8k_no_answer": scored["no_answer"],
                      "steps": summary["global_step"], "train_seconds": round(summary["train_seconds"], 1),
                      "adapter": summary["adapter"]}
    results = {"runs": runs, "model": model, "train_data": str(train_file), "test_data": str(test_file),
               "config": str(config_file), "seed": seed, "seconds": round(time.perf_counter() - start, 1),
               "environment": environment()}  # the figures are exact for one CPU type and these versions
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results
