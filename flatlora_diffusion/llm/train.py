"""The LLM recipe: LoRA or Flat-LoRA fine-tuning of a causal LM with the transformers `Trainer`.

    recipe = LLMRecipe(load_config(["--config", "configs/llm_metamath.yaml"]))
    recipe.setup()      # tokenizer, arguments, data, model + LoRA, optimiser (LoRA+), Trainer, Flat-LoRA
    recipe.train()      # resumes from `training.resume`; the best checkpoint by eval loss at the end
    recipe.save()       # output_dir/adapter (+ tokenizer), output_dir/merged (`training.merge`), summary

What it does, in the paper's terms: the base is loaded in ``model.dtype`` (bf16) and frozen; peft
wraps the target linears with fp32 LoRA weights; LoRA+ (when ``lora.loraplus_lr_ratio`` is set)
is the optimiser given to the Trainer, so it applies with Flat-LoRA too (the reference code drops
it); Flat-LoRA is the core's `Trainer` callback, whose ramp follows optimiser steps
(``state.global_step`` over ``state.max_steps``), so it is right under gradient accumulation and
any number of processes. Multi-GPU: ``accelerate launch --num_processes N -m flatlora_diffusion.llm
train ...`` or ``torchrun --nproc_per_node N -m flatlora_diffusion.llm train ...``; the gradient
accumulation is computed from ``training.effective_batch_size`` and the number of processes.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import time
from pathlib import Path

import torch
from torch import nn

from flatlora_diffusion.files import write_text
from flatlora_diffusion.llm.config import ConfigError, LLMError, LLMTrainConfig
from flatlora_diffusion.llm.data import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE, Collator, build_datasets
from flatlora_diffusion.quiet import benign_warnings

QV_TARGETS = ("q_proj", "v_proj")


class RecipeError(LLMError):
    """Bad input met while setting up or saving a run (model, targets, checkpoints, adapters)."""


# ---------------------------------------------------------------------------------------------
# Building blocks (also used by `merge` and the tests)


def local_model(name_or_path: str, flag: str = "model.name_or_path") -> str:
    """The folder of a `toy:`/`tiny:` id (`flatlora_diffusion.model_ids`); other ids unchanged."""
    from flatlora_diffusion.model_ids import ModelIdError, resolve_model_id

    try:
        return resolve_model_id(name_or_path, flag)
    except ModelIdError as err:
        raise RecipeError(str(err)) from err


def load_base_model(name_or_path: str, dtype: str = "float32", **kwargs):
    """`AutoModelForCausalLM.from_pretrained` with errors that name `model.name_or_path` and the fix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name_or_path = local_model(name_or_path)
    try:
        AutoConfig.from_pretrained(name_or_path, **{k: v for k, v in kwargs.items() if k != "attn_implementation"})
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"Could not load `model.name_or_path` `{name_or_path}`: {str(err).strip().splitlines()[0]}\n"
            f"Pass a local model folder, or download it once (`hf download {name_or_path}`) and run with "
            "`HF_HUB_OFFLINE=1`."
        ) from err
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype), **kwargs)
    except ValueError as err:
        raise RecipeError(f"`model.name_or_path` `{name_or_path}` is not a causal language model "
                          f"({str(err).strip().splitlines()[0]}); pass a decoder LM such as a Llama checkpoint.") from err


def linear_layer_names(model: nn.Module) -> dict[str, list[str]]:
    """Leaf name → full names of the `nn.Linear` layers LoRA may target (the output head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: dict[str, list[str]] = {}
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and full.split(".")[-1] != "lm_head":
            names.setdefault(full.split(".")[-1], []).append(full)
    return names


def resolve_targets(model: nn.Module, targets: str | list[str], model_name: str = "the model") -> list[str]:
    """`qv`, `all` or module names → the peft `target_modules` list; an error when something matches nothing.

    Names match a module's last component (`q_proj`) or the end of its dotted path (`self_attn.q_proj`).
    """
    linears = linear_layer_names(model)
    available = ", ".join(sorted(linears)) or "none"
    if targets == "all":
        if not linears:
            raise RecipeError(f"`lora.targets` `all`: {model_name} has no linear layer besides the output head.")
        return sorted(linears)
    wanted = list(QV_TARGETS) if targets == "qv" else [t.strip() for t in targets if t.strip()]
    modules = [name for name, _ in model.named_modules()]
    missing = [t for t in wanted if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        what = "`qv` looks for `q_proj` and `v_proj`, but" if targets == "qv" else "the entries"
        raise RecipeError(
            f"`lora.targets`: {what} {', '.join(f'`{m}`' for m in missing)} match no module of {model_name}. "
            f"Its linear layers are: {available}. Name some of them (`--lora.targets q_proj,v_proj`) or use `all`."
        )
    return wanted


def _adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise RecipeError(f"`--adapter` `{adapter_dir}` has no `adapter_model.safetensors`; pass the `adapter/` "
                          "folder of a run.")
    with safe_open(str(path), "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def check_adapter(model: nn.Module, adapter_dir: str | Path, model_name: str = "the base model") -> dict:
    """Check that the peft adapter in `adapter_dir` fits `model` (layer names and shapes); return its config.

    peft would otherwise fail with a size-mismatch trace, or load an adapter for another base silently
    when the shapes happen to agree and only names differ.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise RecipeError(f"`--adapter` `{adapter_dir}` has no `adapter_config.json`; pass a peft adapter folder "
                          "(a run's `adapter/`).")
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    trained_on = adapter_config.get("base_model_name_or_path") or "an unknown base"
    modules = dict(model.named_modules())
    problems = []
    for key, shape in _adapter_shapes(adapter_dir).items():
        for part in (".lora_A.", ".lora_B."):
            if part not in key:
                continue
            name = key.split(part)[0].removeprefix("base_model.model.")
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                problems.append(f"layer `{name}` does not exist here")
            elif part == ".lora_A." and shape[-1] != layer.in_features:
                problems.append(f"`{name}` takes {shape[-1]} inputs in the adapter, {layer.in_features} here")
            elif part == ".lora_B." and shape[0] != layer.out_features:
                problems.append(f"`{name}` has {shape[0]} outputs in the adapter, {layer.out_features} here")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RecipeError(
            f"`--adapter` `{adapter_dir}` was trained on another base model (`{trained_on}`, see its "
            f"adapter_config.json) and does not fit {model_name}: {'; '.join(problems[:3])}{more}. "
            "Pass the base model the adapter was trained on."
        )
    return adapter_config


def merge_adapter(model_name: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                  **load_kwargs) -> Path:
    """Load the base (on the CPU), check and apply the adapter, merge it into the weights, save model + tokenizer.

    The tokenizer comes from the adapter folder when it has one (it may carry the chat template of training).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = load_base_model(model_name, dtype, **load_kwargs)
    check_adapter(base, adapter_dir, f"`--model` `{model_name}`")
    with benign_warnings():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    source = adapter_dir if has_tokenizer else local_model(model_name, "--model")
    AutoTokenizer.from_pretrained(source, **load_kwargs).save_pretrained(out_dir)
    return out_dir


def _precision_flags(dtype: str, use_cpu: bool) -> dict:
    """Mixed-precision flags of TrainingArguments: autocast in the base's dtype (adapters stay fp32)."""
    if dtype == "float16" and (use_cpu or not torch.cuda.is_available()):
        raise ConfigError(["`model.dtype` float16 needs a CUDA GPU; use bfloat16 or float32 on CPU."])
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16"}


def _world_size() -> int:
    """Processes of this run as `torchrun` / `accelerate launch` announce them (1 when launched plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------
# The recipe


class LLMRecipe:
    """One fine-tuning run: `setup()`, `train()`, `save()` (see the module docstring)."""

    def __init__(self, config: LLMTrainConfig, argv: list[str] | None = None) -> None:
        self.config = config
        self.argv = argv  # the `train` arguments, recorded in the saved config
        self.output_dir = Path(config.training.output_dir)
        self.resume_from: str | None = None
        self.flat_lora = None  # the Flat-LoRA callback when rho > 0
        self.train_result = None

    def setup(self) -> None:
        # Order: the tokenizer shapes the data; the arguments give the device and the process order
        # for data caching; the model must sit on its device before the optimiser holds its
        # parameters; the Flat-LoRA callback needs the Trainer.
        self.resume_from = self._resume_checkpoint()
        self.tokenizer = self._setup_tokenizer()
        self.args = self._setup_args()
        with self.args.main_process_first(desc="preparing data"):
            self.train_data, self.eval_data = build_datasets(self.config.data, self.tokenizer)
        self.model = self._setup_model()
        self.trainer = self._setup_trainer(self._setup_optimizer())
        if self.config.flat_lora.rho > 0:
            from flatlora_diffusion.integrations.transformers import add_flat_lora

            self.flat_lora = add_flat_lora(self.trainer, self.config.flat_lora)
            self.flat_lora.resume_from = self.resume_from
        if self.args.process_index == 0:
            launched = "python -m flatlora_diffusion.llm train " + shlex.join(self.argv) if self.argv else "the API"
            self.config.save_yaml(self.output_dir / "config.yaml",
                                  f"Resolved configuration of this run (launched with: {launched}).")

    def _resume_checkpoint(self) -> str | None:
        from transformers.trainer_utils import get_last_checkpoint

        resume, out = self.config.training.resume, self.output_dir
        existing = get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            if existing:
                raise RecipeError(f"`training.output_dir` `{out}` already holds checkpoints ({Path(existing).name}). "
                                  "Pass `--training.resume latest` to continue that run, or choose another folder.")
            return None
        if resume == "latest":
            if existing is None:
                raise RecipeError(f"`training.resume latest`: no `checkpoint-*` folder in `{out}` to resume from; "
                                  "drop the flag to start fresh.")
            return existing
        if not (Path(resume) / "trainer_state.json").is_file():
            raise RecipeError(f"`training.resume` `{resume}` is not a Trainer checkpoint (no trainer_state.json); "
                              f"pass `latest` or a `{out}/checkpoint-N` folder.")
        return resume

    def _setup_tokenizer(self):
        from transformers import AutoTokenizer

        m = self.config.model
        tokenizer = AutoTokenizer.from_pretrained(local_model(m.name_or_path), revision=m.revision,
                                                  trust_remote_code=m.trust_remote_code)
        if not tokenizer.is_fast:
            raise RecipeError(f"The tokenizer of `{m.name_or_path}` is not a fast tokenizer; the label masking "
                              "needs character offsets. Install `tokenizers` or convert the tokenizer.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.config.data.template in CHAT_TEMPLATES and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # saved with the adapter, so evaluation uses it
        return tokenizer

    def _setup_args(self):
        from transformers import TrainingArguments

        t = self.config.training
        use_cpu = t.device == "cpu"
        world = _world_size()
        if t.effective_batch_size % (t.per_device_batch_size * world):
            raise ConfigError([f"`training.effective_batch_size` ({t.effective_batch_size}) must be a multiple of "
                               f"`training.per_device_batch_size` ({t.per_device_batch_size}) x {world} processes; "
                               "change one of them or the number of processes."])
        has_eval = self.config.data.eval is not None or self.config.data.num_eval > 0
        kwargs = dict(
            output_dir=str(self.output_dir),
            num_train_epochs=t.epochs,
            max_steps=t.max_steps or -1,
            per_device_train_batch_size=t.per_device_batch_size,
            per_device_eval_batch_size=t.per_device_batch_size,
            gradient_accumulation_steps=t.effective_batch_size // (t.per_device_batch_size * world),
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim="adamw_torch",
            logging_steps=t.logging_steps,
            eval_strategy="steps" if has_eval else "no",
            eval_steps=t.eval_steps,
            save_strategy="steps",
            save_steps=t.eval_steps,
            save_total_limit=t.save_total_limit,
            load_best_model_at_end=t.load_best_at_end and has_eval,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            seed=t.seed,
            report_to=[] if t.report_to == "none" else [t.report_to],
            use_cpu=use_cpu,
            dataloader_num_workers=t.dataloader_num_workers,
            label_names=["labels"],  # peft's forward hides them from the Trainer's signature check
            remove_unused_columns=False,
            ddp_find_unused_parameters=False,
            **_precision_flags(self.config.model.dtype, use_cpu),
        )
        parameters = inspect.signature(TrainingArguments).parameters
        # transformers 5 takes the warmup ratio as a float `warmup_steps`; 4.x has `warmup_ratio`.
        if "warmup_ratio" in parameters:
            kwargs["warmup_ratio"] = t.warmup_ratio
        else:
            kwargs["warmup_steps"] = t.warmup_ratio
        # transformers 5 renames gradient checkpointing to activation checkpointing (the old names warn).
        prefix = "activation" if "activation_checkpointing" in parameters else "gradient"
        kwargs[f"{prefix}_checkpointing"] = t.gradient_checkpointing
        kwargs[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
        return TrainingArguments(**kwargs)

    def _setup_model(self):
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        m, lora = self.config.model, self.config.lora
        kwargs = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
        if m.attn_implementation:
            kwargs["attn_implementation"] = m.attn_implementation
        model = load_base_model(m.name_or_path, m.dtype, **kwargs)
        self.targets = resolve_targets(model, lora.targets, f"`model.name_or_path` `{m.name_or_path}`")
        model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
        set_seed(self.config.training.seed)  # the LoRA initialisation
        peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=self.targets, modules_to_save=lora.modules_to_save,
                                 use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                                 bias="none", task_type="CAUSAL_LM")
        # autocast_adapter_dtype: LoRA weights in fp32 even when the base is bf16/fp16.
        with benign_warnings():
            model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
        return model.to(self.args.device)

    def _setup_optimizer(self):
        """LoRA+ param groups (B learns `ratio` x faster), or None for the Trainer's own AdamW."""
        ratio = self.config.lora.loraplus_lr_ratio
        if ratio is None:
            return None
        from peft.optimizers import create_loraplus_optimizer

        t = self.config.training
        return create_loraplus_optimizer(self.model, torch.optim.AdamW, lr=t.learning_rate, loraplus_lr_ratio=ratio,
                                         loraplus_weight_decay=t.weight_decay)

    def _setup_trainer(self, optimizer):
        from transformers import Trainer

        return Trainer(model=self.model, args=self.args, train_dataset=self.train_data, eval_dataset=self.eval_data,
                       data_collator=Collator(self.tokenizer.pad_token_id), processing_class=self.tokenizer,
                       optimizers=(optimizer, None))

    def train(self) -> dict:
        """Run (or resume) the training; the final evaluation loss is that of the model kept at the end."""
        start = time.perf_counter()
        self.train_result = self.trainer.train(resume_from_checkpoint=self.resume_from)
        metrics = {"train_loss": self.train_result.training_loss, "global_step": self.trainer.state.global_step,
                   "train_seconds": time.perf_counter() - start}
        if self.eval_data is not None:
            metrics["eval_loss"] = self.trainer.evaluate()["eval_loss"]
        self.metrics = metrics
        return metrics

    def save(self) -> dict:
        """Adapter (+ tokenizer) to `output_dir/adapter`, merged weights with `training.merge`, a summary JSON."""
        adapter_dir = self.output_dir / "adapter"
        self.trainer.save_model(str(adapter_dir))  # main process only; peft writes adapter_config + weights
        paths = {"adapter": str(adapter_dir)}
        if not self.trainer.is_world_process_zero():
            return paths
        self.tokenizer.save_pretrained(adapter_dir)
        if self.config.training.merge:
            # From the saved files, on the CPU: the trained model stays as it is (and on its device).
            m = self.config.model
            paths["merged"] = str(merge_adapter(m.name_or_path, adapter_dir, self.output_dir / "merged", m.dtype,
                                                revision=m.revision, trust_remote_code=m.trust_remote_code))
        summary = {**getattr(self, "metrics", {}), "rho": self.config.flat_lora.rho, "targets": self.targets,
                   "best_checkpoint": self.trainer.state.best_model_checkpoint, **paths}
        write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def run(config: LLMTrainConfig, argv: list[str] | None = None) -> dict:
    """Set up, train and save one run; returns its summary."""
    recipe = LLMRecipe(config, argv)
    recipe.setup()
    recipe.train()
    return recipe.save()


__all__ = ["LLMRecipe", "RecipeError", "check_adapter", "load_base_model",
           "merge_adapter", "resolve_targets", "run"]
