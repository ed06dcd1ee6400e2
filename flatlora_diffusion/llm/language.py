"""The synthetic arithmetic *language* the toy Llama (`toy:llama`) is pretrained on.

Plain equations and short declarative stories, never the ``Question: … Answer: … #### N`` layout
of the GSM8K demo, so a LoRA fine-tune on the demo data still has something to learn (the format
and the mapping from a question to its equations), as a real base model has before GSM8K::

    7 + 8 = 15
    13 * 4 = 52
    Ava had 6 shells. Ava found 5 more shells. Now Ava has 6 + 5 = 11 shells.
    Leo bought 3 packs of 4 coins and spent 2 of them. 3 * 4 = 12 and 12 - 2 = 10, so 10 coins are left.

Numbers: equations go to `MAX_OPERAND` (and sums/differences to 2 x that), stories to the same
range, so the demo's numbers (up to 9) and the out-of-domain "longer numbers" test (10 to 15,
`synthetic.OOD_NUMBERS`) are both known arithmetic; the out-of-domain question templates of
`synthetic.UNSEEN_KINDS` appear nowhere here. `document(rng, length)` is what the pretraining
samples: segments joined by newlines until the text is at least `length` characters long.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from flatlora_diffusion.llm.synthetic import ITEMS, NAMES

MAX_OPERAND = 15  # largest factor and story number; sums and differences go to 2 * MAX_OPERAND


def _equation(rng: random.Random) -> str:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(0, 2 * MAX_OPERAND), rng.randint(0, 2 * MAX_OPERAND)
        return f"{a} + {b} = {a + b}"
    if op == "-":
        a = rng.randint(1, 2 * MAX_OPERAND)
        b = rng.randint(0, a)
        return f"{a} - {b} = {a - b}"
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return f"{a} * {b} = {a * b}"


def _two_step_equation(rng: random.Random) -> str:
    a, b = rng.randint(2, MAX_OPERAND), rng.randint(2, MAX_OPERAND)
    c = rng.randint(1, a * b - 1)
    return f"{a} * {b} = {a * b}, {a * b} - {c} = {a * b - c}"


def _story_add(rng: random.Random) -> str:
    (name, he), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    return rng.choice((
        f"{name} had {a} {item}. {name} found {b} more {item}. Now {name} has {a} + {b} = {a + b} {item}.",
        f"{name} got {a} {item} in the morning and {b} {item} later. {he} got {a} + {b} = {a + b} {item}.",
    ))


def _story_sub(rng: random.Random) -> str:
    (name, he), item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(2, 2 * MAX_OPERAND)
    b = rng.randint(1, a - 1)
    return rng.choice((
        f"{name} had {a} {item} and lost {b}. {he} kept {a} - {b} = {a - b} {item}.",
        f"{name} sold {b} of {a} {item}, so {a} - {b} = {a - b} {item} remain.",
    ))


def _story_mul(rng: random.Random) -> str:
    (name, _), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, MAX_OPERAND), rng.randint(2, MAX_OPERAND)
    return rng.choice((
        f"There are {a} bags of {item}, {b} in each bag. That makes {a} * {b} = {a * b} {item}.",
        f"{name} made {a} rows of {b} {item}: {a} * {b} = {a * b} {item} in all.",
    ))


def _story_two_step(rng: random.Random) -> str:
    (name, _), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, MAX_OPERAND), rng.randint(2, MAX_OPERAND)
    c = rng.randint(1, a * b - 1)
    return (f"{name} bought {a} packs of {b} {item} and spent {c} of them. "
            f"{a} * {b} = {a * b} and {a * b} - {c} = {a * b - c}, so {a * b - c} {item} are left.")


SEGMENTS: dict[str, tuple[float, Callable[[random.Random], str]]] = {  # name -> (weight, writer)
    "equation": (0.45, _equation), "two_step_equation": (0.1, _two_step_equation),
    "story_add": (0.1, _story_add), "story_sub": (0.1, _story_sub), "story_mul": (0.15, _story_mul),
    "story_two_step": (0.1, _story_two_step),
}


def segment(rng: random.Random) -> str:
    """One equation or story, drawn by the weights of `SEGMENTS`."""
    weights = [w for w, _ in SEGMENTS.values()]
    _, writer = rng.choices(list(SEGMENTS.values()), weights=weights)[0]
    return writer(rng)


def document(rng: random.Random, length: int) -> str:
    """Segments, one per line, until the text has at least `length` characters (a byte each)."""
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < length:
        lines.append(segment(rng))
    return "\n".join(lines)
