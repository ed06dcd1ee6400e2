"""Seeded synthetic arithmetic word problems in GSM8K format, for offline demos and tests.

Each row has a ``question`` and an ``answer`` made of worked reasoning lines and a final
``#### N`` line, exactly like GSM8K (without calculator annotations)::

    {"question": "Mia has 3 apples. She buys 4 more. How many apples does Mia have now?",
     "answer": "3 + 4 = 7\\n#### 7"}

Four kinds of problems (one or two operations on numbers up to ``max_number``): addition,
subtraction, multiplication, and a two-step multiply-then-subtract. The same seed writes the same
files; test questions never appear in the training file.

    python -m flatlora_diffusion.llm synthetic --out data/arith --train 2000 --test 200 --seed 0
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from flatlora_diffusion.files import write_text
from flatlora_diffusion.llm.config import LLMError

_NAMES = [("Mia", "She"), ("Tom", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"),
          ("Ivy", "She"), ("Max", "He"), ("Eva", "She"), ("Ben", "He")]
_ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "coins"]


def _add(rng: random.Random, hi: int) -> tuple[str, str]:
    (name, he), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    return (f"{name} has {a} {item}. {he} buys {b} more. How many {item} does {name} have now?",
            f"{a} + {b} = {a + b}\n#### {a + b}")


def _sub(rng: random.Random, hi: int) -> tuple[str, str]:
    (name, _), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(2, 2 * hi)
    b = rng.randint(1, a - 1)
    return (f"{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?",
            f"{a} - {b} = {a - b}\n#### {a - b}")


def _mul(rng: random.Random, hi: int) -> tuple[str, str]:
    (name, _), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    return (f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have in total?",
            f"{a} * {b} = {a * b}\n#### {a * b}")


def _two_step(rng: random.Random, hi: int) -> tuple[str, str]:
    (name, he), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    c = rng.randint(1, a * b - 1)
    return (f"{name} buys {a} bags with {b} {item} each. {he} gives away {c} {item}. "
            f"How many {item} does {name} have left?",
            f"{a} * {b} = {a * b}\n{a * b} - {c} = {a * b - c}\n#### {a * b - c}")


KINDS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "two_step": _two_step,
}


def make_problems(n: int, seed: int = 0, *, max_number: int = 9, kinds: tuple[str, ...] = tuple(KINDS),
                  exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct problems (no question of `exclude`), drawn from `kinds` in turn with a seeded RNG."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise LLMError(f"`kinds` must be a non-empty subset of {', '.join(KINDS)}, got {list(kinds)}.")
    if n < 0 or max_number < 2:
        raise LLMError(f"Need `n` >= 0 and `max_number` >= 2, got n={n}, max_number={max_number}.")
    rng, rows, seen = random.Random(seed), [], set(exclude)
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise LLMError(f"Only {len(rows)} distinct problems found with `max_number`={max_number}; "
                             "raise `max_number` or ask for fewer.")
        question, answer = KINDS[kinds[len(rows) % len(kinds)]](rng, max_number)
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
