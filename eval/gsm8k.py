"""GSM8K accuracy: batched greedy decoding and answer extraction that tolerates how models write numbers.

    examples = load_examples("gsm8k_test.jsonl")
    result = evaluate(model, tokenizer, examples, GSM8KConfig(model=..., data=...))
    result["accuracy"]

Extraction (`extract_answer`) looks, in order, for the last ``#### N``, ``the answer is N``,
``\\boxed{N}``; in `flexible` mode it falls back to the last number in the text. Numbers may
carry ``$``, thousands separators, a sign (``-`` or ``−``), decimals, ``%`` and trailing text
(``#### 1,234 apples.``). A generation without any answer scores as wrong.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from eval.config import GSM8KConfig
from eval.data import load_rows
from eval.environment import environment
from eval.errors import EvalError
from eval.llm import greedy_generate, load_causal_lm
from flatlora_diffusion.files import write_text

_NUMBER = r"(?P<num>[-−]?\$?\s*[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-−]?\.\d+)"
_STRICT = (
    re.compile(r"####\s*" + _NUMBER),
    re.compile(r"answer\s*(?:is|:|=)\s*[:=]?\s*(?:\*\*)?\s*" + _NUMBER, re.IGNORECASE),
    re.compile(r"\\boxed\{\s*" + _NUMBER),
)
_ANY_NUMBER = re.compile(_NUMBER)
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"
STOP = ("\n\nQuestion:", "Question:", "\n\n\n")


def parse_number(text: str) -> Decimal | None:
    """``-$1,234.50`` → Decimal('-1234.50'); None when it is not a number."""
    cleaned = text.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    negative = cleaned.count("-") % 2 == 1
    try:
        value = Decimal(cleaned.replace("-", ""))
    except InvalidOperation:
        return None
    return -value if negative else value


def extract_answer(text: str, mode: str = "flexible") -> Decimal | None:
    """The model's final numeric answer in `text`, or None when there is none."""
    for pattern in _STRICT:
        matches = list(pattern.finditer(text))
        if matches:
            return parse_number(matches[-1]["num"])
    if mode == "flexible":
        matches = list(_ANY_NUMBER.finditer(text))
        if matches:
            return parse_number(matches[-1]["num"])
    return None


def gold_answer(answer: str) -> Decimal:
    """The reference number of a GSM8K `answer` field (after ``####``)."""
    value = extract_answer(answer, mode="strict")
    if value is None:
        raise EvalError(f"GSM8K answer has no `#### N` line: {answer[-80:]!r}.")
    return value


def is_correct(prediction: Decimal | None, gold: Decimal) -> bool:
    """Numeric equality (``42.0`` == ``42``); a missing prediction is wrong."""
    return prediction is not None and prediction == gold


def build_prompt(question: str, fewshot: list[dict]) -> str:
    """``Question: …\\nAnswer: …`` worked examples (calculator annotations removed), then the question."""
    shots = "".join(f"Question: {ex['question'].strip()}\nAnswer: {_CALCULATOR.sub('', ex['answer']).strip()}\n\n"
                    for ex in fewshot)
    return f"{shots}Question: {question.strip()}\nAnswer:"


def load_examples(config: GSM8KConfig) -> tuple[list[dict], list[dict]]:
    """(examples to evaluate, few-shot examples); few-shot rows never overlap the evaluated ones."""
    rows = load_rows(config.data, ("question", "answer"), config.data_config, config.split)
    if config.fewshot_data:
        fewshot = load_rows(config.fewshot_data, ("question", "answer"))[: config.num_fewshot]
    else:
        fewshot, rows = rows[: config.num_fewshot], rows[config.num_fewshot :]
    if len(fewshot) < config.num_fewshot:
        raise EvalError(f"`--num_fewshot` {config.num_fewshot} needs that many examples; found {len(fewshot)}.")
    if config.limit is not None:
        rows = rows[: config.limit]
    if not rows:
        raise EvalError("No GSM8K examples left to evaluate (check `--data`, `--limit` and `--num_fewshot`).")
    return rows, fewshot


def evaluate(model, tokenizer, examples: list[dict], config: GSM8KConfig, fewshot: list[dict] | None = None) -> dict:
    """Accuracy and one record per example (prompt-free: question, gold, prediction, generation)."""
    prompts = [build_prompt(ex["question"], fewshot or []) for ex in examples]
    generations = greedy_generate(model, tokenizer, prompts, batch_size=config.batch_size,
                                  max_new_tokens=config.max_new_tokens, stop=STOP, chat=config.chat_template,
                                  desc="gsm8k")
    records = []
    for ex, text in zip(examples, generations, strict=True):
        gold, pred = gold_answer(ex["answer"]), extract_answer(text, config.extract)
        records.append({"question": ex["question"], "gold": str(gold), "prediction": None if pred is None else str(pred),
                        "correct": is_correct(pred, gold), "generation": text})
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records), "correct": correct, "n": len(records),
            "no_answer": sum(r["prediction"] is None for r in records), "records": records}


def main(config: GSM8KConfig) -> int:
    """CLI: load, evaluate, print the accuracy, write the JSON and the per-example JSONL."""
    examples, fewshot = load_examples(config)
    model, tokenizer = load_causal_lm(config)
    result = evaluate(model, tokenizer, examples, config, fewshot)
    records = result.pop("records")
    summary = {"task": "gsm8k", **result, "settings": config.to_dict(), "environment": environment()}
    print(json.dumps({k: result[k] for k in ("accuracy", "correct", "n", "no_answer")}, indent=2))
    if config.out:
        out = Path(config.out)
        write_text(out.with_suffix(".samples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
        write_text(out, json.dumps(summary, indent=2) + "\n")
    return 0
