"""The LLM recipe (`flatlora_diffusion.llm`): config, data, targets, Trainer runs with Flat-LoRA, resume, merge, demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import captured_logs
from torch import nn

from flatlora_diffusion.llm.__main__ import main
from flatlora_diffusion.llm.config import ConfigError, DataSettings, load_config
from flatlora_diffusion.llm.data import IGNORE_INDEX, DataError, build_datasets
from flatlora_diffusion.llm.synthetic import make_problems, write_jsonl, write_splits
from flatlora_diffusion.llm.train import LLMRecipe, RecipeError, check_adapter, merge_adapter, resolve_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> tuple[Path, Path]:
    """Synthetic GSM8K-style train/test files (64 / 8 problems)."""
    return write_splits(tmp_path_factory.mktemp("arith"), n_train=64, n_test=8, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)


def tiny_config(model: Path, train: Path, out: Path, *extra: str):
    """A few-step CPU run of the tiny Llama: micro-batch 2, accumulation 2, fp32, no checkpointing."""
    return load_config([
        "--model.name_or_path", str(model), "--model.dtype", "float32",
        "--data.train", str(train), "--data.template", "gsm8k", "--data.max_length", "256",
        "--training.output_dir", str(out), "--training.max_steps", "4", "--training.effective_batch_size", "4",
        "--training.per_device_batch_size", "2", "--training.gradient_checkpointing", "false",
        "--training.eval_steps", "2", "--training.logging_steps", "1", "--training.device", "cpu",
        "--training.load_best_at_end", "false", "--lora.dropout", "0", "--training.learning_rate", "1e-2",
        *extra,
    ])


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("llm_*.yaml")))
def test_shipped_configs_load(name):
    config = load_config(["--config", str(CONFIGS / name)])
    assert config.lora.rank == 8 and config.lora.alpha == 16
    assert config.training.warmup_ratio == 0.03 and config.training.lr_scheduler == "cosine"
    if name != "llm_demo.yaml":  # the paper's recipes
        assert config.model.name_or_path == "meta-llama/Llama-2-7b-hf" and config.model.dtype == "bfloat16"
        assert config.flat_lora.rho == 0.05 and config.training.learning_rate == 5e-4
        assert config.training.epochs == 2 and config.training.effective_batch_size == 32
        assert config.lora.targets == "all"
    assert (CONFIGS / name).read_text().startswith("#") and "python -m flatlora_diffusion.llm" in (
        CONFIGS / name).read_text()


def test_overrides_dotted_bare_and_lists(tmp_path):
    config = load_config(["--config", str(CONFIGS / "llm_metamath.yaml"), "--rho", "0", "--lora.targets",
                          "q_proj,k_proj", "--learning_rate=1e-4", "--training.seed", "3", "--loraplus_lr_ratio", "16"])
    assert config.flat_lora.rho == 0 and config.lora.targets == ["q_proj", "k_proj"]
    assert config.training.learning_rate == 1e-4 and config.training.seed == 3 and config.lora.loraplus_lr_ratio == 16
    saved = config.save_yaml(tmp_path / "config.yaml", "header line")
    assert saved.read_text().startswith("# header line")
    assert load_config(["--config", str(saved)]) == config


def test_config_errors_are_gathered():
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(CONFIGS / "llm_metamath.yaml"), "--lora.rnk", "4", "--rho", "2",
                     "--lora.rank", "zero", "--training.per_device_batch_size", "5", "--seed", "1",
                     "--data.num_eval", "0", "--lora.targets", "qkv", "--data.template", "alpaca"])
    message = str(info.value)
    for expected in ("Unknown key `lora.rnk`. Did you mean `lora.rank`?", "`flat_lora.rho` must be a number in [0, 1]",
                     "`lora.rank` must be an integer", "must be a multiple of `training.per_device_batch_size` (5)",
                     "`--seed` is ambiguous", "`data.template` must be one of"):
        assert expected in message
    assert len(info.value.errors) >= 6
    with pytest.raises(ConfigError, match="`lora.targets` must be `qv`, `all` or a list"):
        load_config(["--config", str(CONFIGS / "llm_metamath.yaml"), "--lora.targets", "qkv"])
    with pytest.raises(ConfigError, match="`training.load_best_at_end` needs evaluation data"):
        load_config(["--config", str(CONFIGS / "llm_metamath.yaml"), "--data.num_eval", "0"])
    with pytest.raises(ConfigError, match="`model.name_or_path` is required"):
        load_config(["--data.train", "x.jsonl", "--training.output_dir", "out", "--training.load_best_at_end", "false"])
    with pytest.raises(ConfigError, match="unknown section `trainig`; sections: .* Did you mean `training`"):
        load_config(base={"trainig": {"epochs": 1}})


def test_cli_reports_config_errors(capsys):
    assert main(["train", "--config", str(CONFIGS / "llm_metamath.yaml"), "--lora.rank", "0"]) == 2
    assert "error: Invalid LLM training configuration" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0
    assert "--flat_lora.rho" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Data


def test_missing_fields_named_with_file_and_line(tmp_path, tokenizer):
    rows = [{"query": "1+1?", "response": "2"}, {"query": "2+2?", "response": "4"}, {"query": "3+3?"}]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl` line 4 lacks `response`"):
        build_datasets(DataSettings(train=str(path), template="metamath"), tokenizer)
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet` row 3 lacks `response`"):
        build_datasets(DataSettings(train=str(tmp_path / "bad.parquet"), template="metamath"), tokenizer)
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl` line 2 is not valid JSON"):
        build_datasets(DataSettings(train=str(path), template="metamath"), tokenizer)
    messages = tmp_path / "chat.jsonl"
    write_jsonl([{"messages": [{"role": "user", "content": "hi"}]}], messages)
    with pytest.raises(DataError, match=r"chat.jsonl` line 1 has no assistant turn"):
        build_datasets(DataSettings(train=str(messages), template="code_feedback"), tokenizer)
    with pytest.raises(DataError, match="`data.train` file .* does not exist"):
        build_datasets(DataSettings(train=str(tmp_path / "nope.jsonl")), tokenizer)


def test_labels_masked_on_the_prompt(tmp_path, tokenizer):
    path = write_jsonl([{"query": "What is 2+3?", "response": "2+3=5.\nThe answer is: 5"}], tmp_path / "m.jsonl")
    train, _ = build_datasets(DataSettings(train=str(path), template="metamath"), tokenizer)
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    prompt_len = len(tokenizer("Question: What is 2+3?\nAnswer:")["input_ids"])  # with BOS
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len:]) == " 2+3=5.\nThe answer is: 5</s>"

    chat = write_jsonl([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                                      {"role": "assistant", "content": "d"}]}], tmp_path / "c.jsonl")
    train, _ = build_datasets(DataSettings(train=str(chat), template="code_feedback"), tokenizer)
    learned = [t for t in train[0]["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "b</s>\nd</s>\n"  # both assistant turns, nothing of the others

    wizard = write_jsonl([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]},
                          {"instruction": "q2", "output": "r2"}], tmp_path / "w.jsonl")
    train, _ = build_datasets(DataSettings(train=str(wizard), template="wizardlm", shuffle_seed=0), tokenizer)
    assert sorted(tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) for row in train) == [
        "r2</s>\n", "r</s>\n"]


def test_selection_filters_shuffles_and_holds_out(tmp_path, tokenizer):
    rows = [{"query": f"q{i}", "response": f"r{i}", "type": "GSM_AnsAug" if i % 2 else "MATH_FOBAR"} for i in range(40)]
    rows[1]["response"] = "x" * 500  # too long: dropped
    path = write_jsonl(rows, tmp_path / "m.jsonl")
    settings = DataSettings(train=str(path), type_filter="GSM", max_length=64, num_train=12, num_eval=4)
    train, evaluation = build_datasets(settings, tokenizer)
    again, _ = build_datasets(settings, tokenizer)
    queries = [tokenizer.decode(r["input_ids"]) for r in train]
    assert len(train) == 12 and len(evaluation) == 4
    assert queries == [tokenizer.decode(r["input_ids"]) for r in again]  # seeded
    assert not set(queries) & {tokenizer.decode(r["input_ids"]) for r in evaluation}
    assert all("Question: q" in q and int(q.split("Question: q")[1].split("\n")[0]) % 2 == 1 for q in queries)
    assert queries != sorted(queries, key=lambda q: int(q.split("Question: q")[1].split("\n")[0]))  # shuffled
    with pytest.raises(DataError, match="fewer than `data.num_train` \\+ `data.num_eval` = 40"):
        build_datasets(DataSettings(train=str(path), type_filter="GSM", num_train=36, num_eval=4), tokenizer)


def test_synthetic_problems_are_gsm8k_format(arith):
    from eval.gsm8k import gold_answer

    train, test = ([json.loads(line) for line in p.read_text().splitlines()] for p in arith)
    assert len(train) == 64 and len(test) == 8
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for row in train + test:
        assert gold_answer(row["answer"]) >= 0 and "\n#### " in row["answer"]
    assert make_problems(5, seed=1) == make_problems(5, seed=1) != make_problems(5, seed=2)


# ---------------------------------------------------------------------------------------------
# Targets and adapters


def test_targets_qv_all_and_matches_nothing(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    assert resolve_targets(model, "qv") == ["q_proj", "v_proj"]
    assert resolve_targets(model, "all") == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]  # no lm_head, no embeddings
    assert resolve_targets(model, ["self_attn.q_proj", "up_proj"]) == ["self_attn.q_proj", "up_proj"]
    with pytest.raises(RecipeError, match=r"`query_key_value` match no module .* linear layers are: down_proj"):
        resolve_targets(model, ["q_proj", "query_key_value"])


def test_adapter_for_another_base_is_refused(tiny_llama_path, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_path),
                   LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(RecipeError, match=r"was trained on another base model .* takes 64 inputs in the adapter, 32 here"):
        check_adapter(other, adapter)
    assert main(["merge", "--model", str(tmp_path / "other"), "--adapter", str(adapter), "--out",
                 str(tmp_path / "merged")]) == 2
    assert "Pass the base model the adapter was trained on" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="has no `adapter_config.json`"):
        check_adapter(other, tmp_path)


# ---------------------------------------------------------------------------------------------
# Trainer runs


class _Observer:
    """A Trainer callback recording, at every optimiser step, which linears carry the Flat-LoRA forward."""

    def __new__(cls, model):
        from transformers import TrainerCallback

        class Observer(TrainerCallback):
            def __init__(self):
                self.patched, self.factors, self.steps = [], [], []

            def on_step_end(self, args, state, control, **kwargs):
                self.patched.append({n for n, m in model.named_modules()
                                     if isinstance(m, nn.Linear) and "forward" in m.__dict__})
                self.steps.append(state.global_step)

        return Observer()


@pytest.fixture(scope="module")
def flat_run(tiny_llama_path, arith, tmp_path_factory):
    """One Flat-LoRA + LoRA+ run with evaluation, best checkpoint and merged export; what it saw along the way."""
    out = tmp_path_factory.mktemp("flat_run")
    config = tiny_config(tiny_llama_path, arith[0], out, "--rho", "0.05", "--lora.targets", "qv",
                         "--lora.loraplus_lr_ratio", "16", "--data.num_eval", "8", "--training.load_best_at_end",
                         "true", "--training.merge", "true")
    recipe = LLMRecipe(config)
    recipe.setup()
    model = recipe.trainer.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    groups = [{"lr": g["lr"], "params": {id(p) for p in g["params"]}} for g in recipe.trainer.optimizer.param_groups]
    names = {id(p): n for n, p in model.named_parameters()}
    observer = _Observer(model)
    recipe.trainer.add_callback(observer)
    metrics = recipe.train()
    summary = recipe.save()
    return {"recipe": recipe, "frozen": frozen, "groups": groups, "names": names, "observer": observer,
            "metrics": metrics, "summary": summary, "out": out}


def test_flat_lora_perturbs_exactly_the_lora_layers_and_keeps_the_base(flat_run, tiny_llama_path):
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    recipe, observer = flat_run["recipe"], flat_run["observer"]
    model = recipe.trainer.model
    lora_bases = {f"{n}.base_layer" for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(lora_bases) == 4 and all(n.endswith(("q_proj.base_layer", "v_proj.base_layer")) for n in lora_bases)
    assert observer.steps == [1, 2, 3, 4]
    assert all(patched == lora_bases for patched in observer.patched)  # exactly the LoRA-wrapped linears
    logged = [e["flat_lora/rho_t"] for e in recipe.trainer.state.log_history if "loss" in e]
    assert len(logged) == 4 and logged[0] == 0 and 0 < logged[-1] < 0.05
    assert not any("forward" in m.__dict__ for m in model.modules())  # removed at the end
    # The base is bit-identical to the checkpoint on disk after training under noise.
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_llama_path).named_parameters())
    for name, before in flat_run["frozen"].items():
        assert torch.equal(before, dict(model.named_parameters())[name])
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(before, base[plain])


def test_loraplus_groups_with_flat_lora(flat_run):
    recipe, groups, names = flat_run["recipe"], flat_run["groups"], flat_run["names"]
    assert recipe.flat_lora is not None and flat_run["observer"].patched[0]  # perturber installed, rho > 0
    lr = recipe.config.training.learning_rate
    by_lr = {}
    for group in groups:
        by_lr.setdefault(group["lr"], set()).update(names[i] for i in group["params"])
    assert set(by_lr) >= {lr, 16 * lr}
    assert by_lr[16 * lr] and all("lora_B" in n for n in by_lr[16 * lr])
    assert by_lr[lr] and all("lora_A" in n for n in by_lr[lr])
    # The Trainer trained with these groups (its scheduler scales both alike).
    initial = sorted({g["initial_lr"] for g in recipe.trainer.optimizer.param_groups if g["params"]})
    assert initial == [lr, 16 * lr]


def test_run_outputs_best_checkpoint_and_merged_export(flat_run, tiny_llama_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary, out = flat_run["summary"], flat_run["out"]
    assert summary["best_checkpoint"] and Path(summary["best_checkpoint"]).name in ("checkpoint-2", "checkpoint-4")
    assert {"train_loss", "eval_loss", "global_step"} <= set(flat_run["metrics"])
    assert json.loads((out / "summary.json").read_text())["rho"] == 0.05
    assert yaml.safe_load((out / "config.yaml").read_text())["flat_lora"]["rho"] == 0.05
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer_config.json").is_file()
    tokens = torch.tensor([[0, 51, 87, 71, 85, 86, 75, 81, 80, 28]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, reference(tokens).logits, atol=1e-4, rtol=1e-4)
    exported = merge_adapter(str(tiny_llama_path), adapter, out / "merged2", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(exported).eval()(tokens).logits,
                                   reference(tokens).logits, atol=1e-4, rtol=1e-4)


def test_resume_continues_to_the_same_adapter(tiny_llama_path, arith, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    def train(out, resume=None, stop=False):
        extra = ["--rho", "0.05"] + (["--training.resume", resume] if resume else [])
        recipe = LLMRecipe(tiny_config(tiny_llama_path, arith[0], out, *extra))
        recipe.setup()
        observer = _Observer(recipe.trainer.model)
        recipe.trainer.add_callback(observer)
        if stop:
            recipe.trainer.add_callback(StopAt())
        recipe.train()
        return lora_state(recipe.trainer.model), observer.steps

    full, steps = train(tmp_path / "full")
    assert steps == [1, 2, 3, 4]
    _, steps = train(tmp_path / "split", stop=True)
    assert steps == [1, 2] and (tmp_path / "split" / "checkpoint-2").is_dir()
    with pytest.raises(RecipeError, match="already holds checkpoints .* `--training.resume latest`"):
        LLMRecipe(tiny_config(tiny_llama_path, arith[0], tmp_path / "split")).setup()
    resumed, steps = train(tmp_path / "split", resume="latest")
    assert steps == [3, 4]  # continues at global step 2
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6)


def test_bf16_base_with_fp32_adapters(tiny_llama_path, arith, tmp_path):
    recipe = LLMRecipe(tiny_config(tiny_llama_path, arith[0], tmp_path, "--model.dtype", "bfloat16",
                                   "--lora.use_dora", "true", "--lora.use_rslora", "true"))
    recipe.setup()
    dtypes = {n: p.dtype for n, p in recipe.trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert recipe.args.bf16 and recipe.args.gradient_accumulation_steps == 2
    assert recipe.trainer.model.peft_config["default"].use_dora


def test_target_that_matches_nothing_stops_the_run(tiny_llama_path, arith, tmp_path, capsys):
    argv = ["train", "--config", str(CONFIGS / "llm_demo.yaml"), "--model.name_or_path", str(tiny_llama_path),
            "--data.train", str(arith[0]), "--data.num_eval", "8", "--training.output_dir", str(tmp_path),
            "--lora.targets", "[c_attn]"]
    assert main(argv) == 2
    assert "`lora.targets`: the entries `c_attn` match no module" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """The demo at test size, recording every warning and library log line it gives."""
    import warnings

    from flatlora_diffusion.llm.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    with warnings.catch_warnings(record=True) as caught, captured_logs("transformers", "peft") as logs:
        warnings.simplefilter("always")
        results = run_demo(out, max_steps=2, n_train=32, n_eval=8, n_test=4, max_new_tokens=8)
    return {"results": results, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught], "logs": logs,
            "out": out}


def test_demo_writes_results(demo_run):
    out, results = demo_run["out"], demo_run["results"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == results and set(saved["runs"]) == {"lora", "flat_lora"}
    for name, rho in (("lora", 0.0), ("flat_lora", 0.05)):
        run = saved["runs"][name]
        assert run["rho"] == rho and run["steps"] == 2
        assert {"train_loss", "eval_loss", "gsm8k_accuracy"} <= set(run)
        assert 0 <= run["gsm8k_accuracy"] <= 1 and run["gsm8k_n"] == 4
        assert run["train_loss"] > 0 and run["eval_loss"] > 0
        assert (out / "runs" / name / "gsm8k.json").is_file()
    environment = saved["environment"]
    assert environment["cpu"]["threads"] >= 1 and environment["cpu"]["capability"]
    assert {"torch", "transformers", "peft"} <= set(environment["packages"])


def test_demo_runs_without_library_warnings(demo_run):
    """Training and scoring print no warning: ours fixed (transformers 5 names), benign ones filtered narrowly."""
    assert demo_run["warnings"] == []
    assert demo_run["logs"] == []  # e.g. transformers' "mtime may not be reliable" when checkpoints come fast


def test_demo_is_deterministic(demo_run, tmp_path):
    """A second run with the same seed gives the same adapters, losses and generations, bit for bit.

    (1 and 2 threads gave the same bits too when measured by hand; 2 threads are too slow on a shared 2-core box.)
    """
    from flatlora_diffusion.llm.demo import run_demo

    again = run_demo(tmp_path, max_steps=2, n_train=32, n_eval=8, n_test=4, max_new_tokens=8)
    first = demo_run["results"]
    for name in ("lora", "flat_lora"):
        keep = ("train_loss", "eval_loss", "gsm8k_accuracy", "gsm8k_correct", "steps")
        assert {k: again["runs"][name][k] for k in keep} == {k: first["runs"][name][k] for k in keep}
        for file in ("adapter/adapter_model.safetensors", "gsm8k.samples.jsonl"):
            assert (tmp_path / "runs" / name / file).read_bytes() == (demo_run["out"] / "runs" / name / file).read_bytes()


def test_scoring_does_not_depend_on_the_batch(demo_run):
    """Greedy generations are the same whatever the prompts batched with them (left padding, other lengths)."""
    from flatlora_diffusion.llm.demo import score_gsm8k

    out, model = demo_run["out"], demo_run["results"]["model"]
    scored = [score_gsm8k(model, out / "runs" / "flat_lora" / "adapter", out / "data" / "test.jsonl",
                          device="cpu", dtype="float32", batch_size=size, max_new_tokens=8)["records"]
              for size in (1, 3)]
    assert [r["generation"] for r in scored[0]] == [r["generation"] for r in scored[1]]

