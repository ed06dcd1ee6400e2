"""GSM8K: answer extraction, prompts, data loading, and batched greedy decoding on the tiny Llama."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from eval import cli, gsm8k
from eval.config import GSM8KConfig
from eval.errors import EvalError
from eval.llm import greedy_generate, load_causal_lm

EXAMPLES = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A shirt costs $1,200 and is discounted by $34. Price?", "answer": "1200 - 34 = 1166\n#### 1,166"},
    {"question": "It is -3 degrees and cools by 2. Temperature?", "answer": "-3 - 2 = -5\n#### -5"},
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 1,234 apples.", "1234"),
        ("The answer is $42.", "42"),
        ("So the final answer is: **-17**", "-17"),
        ("Therefore the answer is 3.50 dollars", "3.5"),
        ("answer: −8", "-8"),
        ("We get \\boxed{1,000,000}.", "1000000"),
        ("#### 12\n\nQuestion: next one ... #### 99", "99"),  # last marker wins (generation is cut at STOP first)
        ("She pays 5 + 6 = 11 dollars, so 11 in total.", "11"),  # flexible: the last number
        ("I earn 20% more, i.e. 0.5 of it", "0.5"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert gsm8k.extract_answer(text) == Decimal(expected)


def test_strict_mode_needs_an_answer_marker() -> None:
    assert gsm8k.extract_answer("5 + 6 = 11", mode="strict") is None
    assert gsm8k.extract_answer("the answer is 11", mode="strict") == 11
    assert gsm8k.extract_answer("I need to answer 3 questions first", mode="strict") is None


def test_no_answer_is_wrong_not_an_error() -> None:
    assert gsm8k.extract_answer("I do not know.") is None
    assert not gsm8k.is_correct(None, Decimal(7))
    assert gsm8k.is_correct(Decimal("7.0"), Decimal(7))


def test_gold_answers() -> None:
    assert [gsm8k.gold_answer(e["answer"]) for e in EXAMPLES] == [7, 1166, -5]
    with pytest.raises(EvalError, match="no `#### N` line"):
        gsm8k.gold_answer("just text")


def test_fewshot_prompt_drops_calculator_annotations() -> None:
    prompt = gsm8k.build_prompt("How many?", EXAMPLES[:1])
    assert prompt == (f"Question: {EXAMPLES[0]['question']}\nAnswer: 3 + 4 = 7\n#### 7\n\n"
                      "Question: How many?\nAnswer:")


def test_evaluate_scores_generations(monkeypatch) -> None:
    canned = ["3 + 4 = 7\n#### 7", "The answer is $1,166.", "I am not sure."]
    monkeypatch.setattr(gsm8k, "greedy_generate", lambda *args, **kwargs: canned)
    config = GSM8KConfig(model="m", data="d", device="cpu")
    result = gsm8k.evaluate(None, None, EXAMPLES, config)
    assert (result["correct"], result["n"], result["no_answer"]) == (2, 3, 1)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert [r["prediction"] for r in result["records"]] == ["7", "1166", None]


def test_local_jsonl_and_fewshot_split(tmp_path: Path) -> None:
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    rows, shots = gsm8k.load_examples(GSM8KConfig(model="m", data=str(data), num_fewshot=1, limit=1, device="cpu"))
    assert shots == EXAMPLES[:1] and rows == EXAMPLES[1:2]  # few-shot rows are never evaluated
    data.write_text('{"question": "q"}\n')
    with pytest.raises(EvalError, match="line 1 lacks `answer`"):
        gsm8k.load_examples(GSM8KConfig(model="m", data=str(data), device="cpu"))
    with pytest.raises(EvalError, match="`--data` file `missing.jsonl` does not exist"):
        gsm8k.load_examples(GSM8KConfig(model="m", data="missing.jsonl", device="cpu"))


def test_batched_generation_matches_one_by_one(tiny_llama_path: Path) -> None:
    model, tokenizer = load_causal_lm(GSM8KConfig(model=str(tiny_llama_path), data="d", device="cpu"))
    assert tokenizer.padding_side == "left"
    prompts = [gsm8k.build_prompt(e["question"], []) for e in EXAMPLES] + ["Hi"]  # different lengths
    batched = greedy_generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=6)
    assert batched == greedy_generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=6)


def test_cli_end_to_end(tiny_llama_path: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "gsm8k.json"
    code = cli.main(["gsm8k", "--model", str(tiny_llama_path), "--data", str(data), "--batch_size", "2",
                     "--max_new_tokens", "8", "--device", "cpu", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1
    assert result["protocol"] == "project" and result["settings"]["batch_size"] == 2 and "transformers" in result["environment"]["packages"]
    assert len(out.with_suffix(".samples.jsonl").read_text().splitlines()) == 3
    assert json.loads(capsys.readouterr().out)["n"] == 3


def test_wrong_model_type(tiny_clip_path: Path) -> None:
    with pytest.raises(EvalError, match="is a `clip` model, not a causal language model"):
        load_causal_lm(GSM8KConfig(model=str(tiny_clip_path), data="d", device="cpu"))


def test_adapter_and_its_own_tokenizer_are_loaded(tiny_llama_path: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    tokenizer.chat_template = "{{ messages[0]['content'] }} =>"  # what the recipe trained with
    tokenizer.save_pretrained(adapter)
    model, loaded = load_causal_lm(GSM8KConfig(model=str(tiny_llama_path), adapter=str(adapter), data="d",
                                               device="cpu"))
    assert isinstance(model, PeftModel) and loaded.chat_template == tokenizer.chat_template
    with pytest.raises(EvalError, match="has no `adapter_config.json`"):
        load_causal_lm(GSM8KConfig(model=str(tiny_llama_path), adapter=str(tmp_path), data="d", device="cpu"))


@pytest.mark.parametrize(("text", "project", "reference"), [
    ("3 + 4 = 7\n#### 7", "7", "7"),
    ("#### $18", "18", None),  # the reference reads digits right after the marker only
    ("#### -3", "-3", None),
    ("#### 18.5", "18.5", "18"),
    ("#### 5, no wait: #### 7", "7", "5"),  # a later correction: the reference keeps the first marker
    ("The answer is: 42", "42", None),
])
def test_reference_protocol_extraction(text: str, project: str | None, reference: str | None) -> None:
    for name, expected in (("project", project), ("reference", reference)):
        got = gsm8k.PROTOCOLS[name].extract(text, "flexible")
        assert got == (None if expected is None else Decimal(expected)), name


def test_reference_protocol_prompt_and_json(monkeypatch, tmp_path: Path) -> None:
    assert gsm8k.build_prompt("How many?", EXAMPLES[:1], "reference") == (
        f"Q: {EXAMPLES[0]['question']}\nA: 3 + 4 = 7\n#### 7\n\nQ: How many?\nA: ")
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(prompts=prompts, stop=kwargs["stop"])
        return ["#### 7", "#### 1,166", "#### -5"]

    monkeypatch.setattr(gsm8k, "greedy_generate", fake_generate)
    monkeypatch.setattr(gsm8k, "load_causal_lm", lambda config: (None, None))
    data, out = tmp_path / "test.jsonl", tmp_path / "gsm8k.json"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    assert cli.main(["gsm8k", "--model", "m", "--data", str(data), "--device", "cpu", "--protocol", "reference",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == result["settings"]["protocol"] == "reference"
    assert result["correct"] == 1  # `1,166` reads as 1 and `-5` as nothing under the reference's extraction
    assert seen["prompts"][0] == f"Q: {EXAMPLES[0]['question']}\nA: " and "\n\nQ:" in seen["stop"]
    with pytest.raises(ValueError, match="`protocol` must be `project` or `reference`"):
        GSM8KConfig(model="m", data="d", device="cpu", protocol="paper")


@pytest.mark.parametrize(("protocol", "templates"), [("project", ("metamath", "gsm8k")),
                                                     ("reference", ("metamath_reference", "gsm8k_reference"))])
def test_training_template_prompt_is_the_eval_prompt(protocol: str, templates: tuple[str, str]) -> None:
    from flatlora_diffusion.llm.data import TEMPLATES

    rows = ({"query": " How many? ", "response": "2 + 2 = 4. The answer is: 4"},
            {"question": " How many? ", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"})
    for template, row in zip(templates, rows, strict=True):
        rendered = TEMPLATES[template](row, None)
        learned_from = rendered.spans[0][0]
        assert gsm8k.build_prompt("How many?", [], protocol).startswith(rendered.text[:learned_from]), template
        assert rendered.text.startswith(gsm8k.build_prompt("How many?", [], protocol)), template
