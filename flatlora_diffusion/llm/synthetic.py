"""Seeded synthetic arithmetic word problems in GSM8K format, for offline demos and tests.

Each row has a ``question`` and an ``answer`` made of worked reasoning lines and a final
``#### N`` line, exactly like GSM8K (without calculator annotations)::

    {"question": "Mia has 3 apples. She buys 4 more. How many apples does Mia have now?",
     "answer": "3 + 4 = 7\\n#### 7"}

Four kinds of problems (one or two operations on numbers from ``min_number`` to ``max_number``):
addition, subtraction, multiplication, and a two-step multiply-then-subtract. The same seed writes
the same files; test questions never appear in the training file.

Out-of-domain variants, for the toy LLM comparison (`flatlora_diffusion.llm.compare`):
``OOD_NUMBERS`` (the same templates with numbers 10 to 15) and `UNSEEN_KINDS` (the same four
operations asked in question templates that neither the demo data nor the pretraining language
`flatlora_diffusion.llm.language` uses).

    python -m flatlora_diffusion.llm synthetic --out data/arith --train 2000 --test 200 --seed 0
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from flatlora_diffusion.files import write_text
from flatlora_diffusion.llm.config import LLMError

NAMES = [("Mia", "She"), ("Tom", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"),
          ("Ivy", "She"), ("Max", "He"), ("Eva", "She"), ("Ben", "He")]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "coins"]


def _add(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    (name, he), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return (f"{name} has {a} {item}. {he} buys {b} more. How many {item} does {name} have now?",
            f"{a} + {b} = {a + b}\n#### {a + b}")


def _sub_numbers(rng: random.Random, lo: int, hi: int) -> tuple[int, int]:
    a = rng.randint(max(2, 2 * lo), 2 * hi)
    return a, rng.randint(lo, a - 1)


def _sub(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    (name, _), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = _sub_numbers(rng, lo, hi)
    return (f"{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?",
            f"{a} - {b} = {a - b}\n#### {a - b}")


def _mul(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    (name, _), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(max(2, lo), hi), rng.randint(max(2, lo), hi)
    return (f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have in total?",
            f"{a} * {b} = {a * b}\n#### {a * b}")


def _two_step_numbers(rng: random.Random, lo: int, hi: int) -> tuple[int, int, int]:
    a, b = rng.randint(max(2, lo), hi), rng.randint(max(2, lo), hi)
    return a, b, rng.randint(1, a * b - 1)


def _two_step(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    (name, he), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = _two_step_numbers(rng, lo, hi)
    return (f"{name} buys {a} bags with {b} {item} each. {he} gives away {c} {item}. "
            f"How many {item} does {name} have left?",
            f"{a} * {b} = {a * b}\n{a * b} - {c} = {a * b - c}\n#### {a * b - c}")


def _unseen_add(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    item = rng.choice(ITEMS)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return (f"A jar holds {a} {item}. Somebody puts {b} more {item} into the jar. How many {item} are in the jar?",
            f"{a} + {b} = {a + b}\n#### {a + b}")


def _unseen_sub(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    item = rng.choice(ITEMS)
    a, b = _sub_numbers(rng, lo, hi)
    return (f"There were {a} {item} on the table. Then {b} {item} were taken away. How many {item} are still "
            "on the table?", f"{a} - {b} = {a - b}\n#### {a - b}")


def _unseen_mul(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    item = rng.choice(ITEMS)
    a, b = rng.randint(max(2, lo), hi), rng.randint(max(2, lo), hi)
    return (f"Each of {a} friends brings {b} {item}. How many {item} do the friends bring altogether?",
            f"{a} * {b} = {a * b}\n#### {a * b}")


def _unseen_two_step(rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    item = rng.choice(ITEMS)
    a, b, c = _two_step_numbers(rng, lo, hi)
    return (f"A shop receives {a} crates holding {b} {item} each and sells {c} {item}. How many {item} does "
            "the shop still have?", f"{a} * {b} = {a * b}\n{a * b} - {c} = {a * b - c}\n#### {a * b - c}")


Writer = Callable[[random.Random, int, int], tuple[str, str]]  # (rng, lo, hi) -> (question, answer)
KINDS: dict[str, Writer] = {"add": _add, "sub": _sub, "mul": _mul, "two_step": _two_step}
UNSEEN_KINDS: dict[str, Writer] = {"unseen_add": _unseen_add, "unseen_sub": _unseen_sub,
                                   "unseen_mul": _unseen_mul, "unseen_two_step": _unseen_two_step}
OOD_NUMBERS = (10, 15)  # (min_number, max_number) of the "longer numbers" test


def make_problems(n: int, seed: int = 0, *, max_number: int = 9, min_number: int = 1,
                  kinds: tuple[str, ...] = tuple(KINDS), exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct problems (no question of `exclude`), drawn from `kinds` in turn with a seeded RNG."""
    writers = {**KINDS, **UNSEEN_KINDS}
    unknown = [k for k in kinds if k not in writers]
    if unknown or not kinds:
        raise LLMError(f"`kinds` must be a non-empty subset of {', '.join(writers)}, got {list(kinds)}.")
    if n < 0 or max_number < 2 or not 1 <= min_number <= max_number:
        raise LLMError(f"Need `n` >= 0, `max_number` >= 2 and 1 <= `min_number` <= `max_number`, got n={n}, "
                       f"min_number={min_number}, max_number={max_number}.")
    rng, rows, seen = random.Random(seed), [], set(exclude)
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise LLMError(f"Only {len(rows)} distinct problems found with `max_number`={max_number}; "
                             "raise `max_number` or ask for fewer.")
        question, answer = writers[kinds[len(rows) % len(kinds)]](rng, min_number, max_number)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": answer})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write `rows` as JSON lines, atomically (a temporary sibling renamed over `path`)."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_splits(out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                 max_number: int = 9) -> tuple[Path, Path]:
    """`out_dir/train.jsonl` and `out_dir/test.jsonl`; no test question is in the training file."""
    out = Path(out_dir)
    test = make_problems(n_test, seed=seed + 1, max_number=max_number)
    train = make_problems(n_train, seed=seed, max_number=max_number, exclude={r["question"] for r in test})
    return write_jsonl(train, out / "train.jsonl"), write_jsonl(test, out / "test.jsonl")
