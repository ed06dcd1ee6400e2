"""GSM8K accuracy: batched greedy decoding and answer extraction that tolerates how models write numbers.

    examples = load_examples("gsm8k_test.jsonl")
    result = evaluate(model, tokenizer, examples, GSM8KConfig(model=..., data=...))
    result["accuracy"]

Extraction (`extract_answer`) looks, in order, for the last ``#### N``, ``the answer is N``,
``\\boxed{N}``; in `flexible` mode it falls back to the last number in the text. Numbers may
carry ``$``, thousands separators, a sign (``-`` or ``−``), decimals, ``%`` and trailing text
(``#### 1,234 apples.``). A generation without any answer scores as wrong.

Two protocols (`--protocol`, recorded in the result JSON), each with its training template in
`flatlora_diffusion.llm.data` so a model is scored on the prompt it was trained on:

* ``project`` (default): ``Question: …\nAnswer:`` and the extraction above.
* ``reference``: the Flat-LoRA reference's ``Q: …\nA: `` prompt and its extraction — the first
  ``#### N`` with N plain digits, read as an integer (``#### $18``, ``#### -3`` are missed,
  ``#### 18.5`` reads 18, a later correction is ignored), to reproduce and compare the paper's numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
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


def reference_answer(text: str, mode: str = "flexible") -> Decimal | None:
    """The reference's extraction: the first ``#### N`` (digits only) as an integer; ``mode`` is not used."""
    match = _REFERENCE.search(text)
    return Decimal(int(match[1])) if match else None


@dataclass(frozen=True)
class Protocol:
    """How a question becomes a prompt, where generation stops, and how the answer is read."""

    question: str  # the prompt's last part, `{question}` filled in; the model continues after it
    shot: str  # one worked example, `{question}` and `{answer}` filled in
    stop: tuple[str, ...]
    extract: Callable[[str, str], Decimal | None]


_REFERENCE = re.compile(r"####\s*(\d+)")
PROTOCOLS = {
    "project": Protocol("Question: {question}\nAnswer:", "Question: {question}\nAnswer: {answer}\n\n", STOP,
                        extract_answer),
    "reference": Protocol("Q: {question}\nA: ", "Q: {question}\nA: {answer}\n\n", ("\n\nQ:", "Q:", "\n\n\n"),
                          reference_answer),
}


def gold_answer(answer: str) -> Decimal:
    """The reference number of a GSM8K `answer` field (after ``####``)."""
    value = extract_answer(answer, mode="strict")
    if value is None:
        raise EvalError(f"GSM8K answer has no `#### N` line: {answer[-80:]!r}.")
    return value


def is_correct(prediction: Decimal | None, gold: Decimal) -> bool:
    """Numeric equality (``42.0`` == ``42``); a missing prediction is wrong."""
    return prediction is not None and prediction == gold


def build_prompt(question: str, fewshot: list[dict], protocol: str = "project") -> str:
    """The protocol's worked examples (calculator annotations removed), then the question."""
    layout = PROTOCOLS[protocol]
    shots = "".join(layout.shot.format(question=ex["question"].strip(), answer=_CALCULATOR.sub("", ex["answer"]).strip())
                    for ex in fewshot)
    return shots + layout.question.format(question=question.strip())


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
    layout = PROTOCOLS[config.protocol]
    prompts = [build_prompt(ex["question"], fewshot or [], config.protocol) for ex in examples]
    generations = greedy_generate(model, tokenizer, prompts, batch_size=config.batch_size,
                                  max_new_tokens=config.max_new_tokens, stop=layout.stop, chat=config.chat_template,
                                  desc="gsm8k")
    records = []
    for ex, text in zip(examples, generations, strict=True):
        gold, pred = gold_answer(ex["answer"]), layout.extract(text, config.extract)
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
    summary = {"task": "gsm8k", "protocol": config.protocol, **result, "settings": config.to_dict(), "environment": environment()}
    print(json.dumps({k: result[k] for k in ("accuracy", "correct", "n", "no_answer")}, indent=2))
    if config.out:
        out = Path(config.out)
        write_text(out.with_suffix(".samples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
        write_text(out, json.dumps(summary, indent=2) + "\n")
    return 0
