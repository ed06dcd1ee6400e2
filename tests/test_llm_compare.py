"""The LoRA vs Flat-LoRA comparison on `toy:llama`: test sets, statistics, report, resume, refused settings."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import flatlora_diffusion.llm.compare as compare_module
from flatlora_diffusion.llm.compare import TEST_SETS, compare, summarise, write_data
from flatlora_diffusion.llm.config import LLMError
from flatlora_diffusion.llm.synthetic import ITEMS, NAMES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_test_sets_are_disjoint_from_training_and_out_of_domain(tmp_path):
    data = write_data(tmp_path, n_train=200, n_test=20)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in data.items()}
    train = {r["question"] for r in rows["train"]}
    for name in TEST_SETS:
        assert len(rows[name]) == 20 and not train & {r["question"] for r in rows[name]}
    numbers = [int(w) for r in rows["ood_numbers"] for w in r["question"].replace(".", " ").split() if w.isdigit()]
    assert min(numbers) >= 10  # every operand of the longer-numbers test is outside the fine-tuning range
    templates = {name: {_template(r["question"]) for r in rows[name]} for name in rows}
    assert templates["in_domain"] <= templates["train"] and templates["ood_numbers"] <= templates["train"]
    assert templates["ood_templates"] and not templates["ood_templates"] & templates["train"]


def _template(question: str) -> str:
    """The question with its numbers, names, pronouns and items replaced by placeholders."""
    words = re.sub(r"\d+", "N", question).replace(".", " .").replace("?", " ?").split()
    names = {w for pair in NAMES for w in pair}
    return " ".join("X" if w in names else "I" if w in ITEMS else w for w in words)


def test_summary_matches_an_independent_computation():
    accuracy = {("lora", 0): 0.30, ("lora", 1): 0.40, ("lora", 2): 0.35,
                ("flat_lora", 0): 0.32, ("flat_lora", 1): 0.37, ("flat_lora", 2): 0.41}
    scores = [{"method": m, "seed": k, "eval_loss": 1.0, "accuracy": {name: a for name in TEST_SETS}}
              for (m, k), a in accuracy.items()]
    table = summarise(scores)
    diffs = [0.02, -0.03, 0.06]
    mean = sum(diffs) / 3
    sem = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    delta = table["delta"]["in_domain"]
    assert delta["mean"] == pytest.approx(mean) and delta["sem"] == pytest.approx(sem) and delta["n_subjects"] == 3
    assert table["methods"]["lora"]["in_domain"]["mean"] == pytest.approx(0.35)
    assert table["seeds"] == [0, 1, 2]


def test_compare_writes_the_report_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    config = tmp_path / "demo.yaml"  # the demo config with 8 held-out problems instead of 64: faster
    config.write_text((CONFIGS / "llm_demo.yaml").read_text().replace("num_eval: 64", "num_eval: 8"))
    out = tmp_path / "cmp"
    results = compare(out, [0], max_steps=2, n_train=80, n_test=3, config_file=config)
    for name in ("results.json", "results.md", "comparison.png", "runs/lora-seed0/scores.json",
                 "runs/flat_lora-seed0/scores.json"):
        assert (out / name).is_file()
    assert json.loads((out / "results.json").read_text())["seeds"] == [0]
    assert "| In-domain |" in (out / "results.md").read_text() and results["cpu_seconds"] > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "train_run", no_training)
    again = compare(out, [0], max_steps=2, n_train=80, n_test=3, config_file=config)  # every run is finished
    assert again["methods"] == results["methods"] and again["delta"] == results["delta"]
    with pytest.raises(LLMError, match="other settings \\(`max_steps` 2 there, 3 now\\)"):
        compare(out, [0], max_steps=3, n_train=80, n_test=3, config_file=config)
    with pytest.raises(LLMError, match="`--seeds` must be distinct"):
        compare(tmp_path / "x", [1, 1])
