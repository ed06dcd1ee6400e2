"""Typed settings of the LLM recipe: one dataclass per concern, YAML sections, dotted command-line overrides.

A config file has one YAML section per dataclass (``model``, ``lora``, ``flat_lora``, ``data``,
``training``); every field carries its help text. Precedence: field defaults < ``--config FILE`` <
command line. Overrides are ``--section.key value`` or, when the key names one field only,
``--key value`` (``--rho 0.05``, ``--learning_rate 1e-4``; ``--seed`` is ambiguous). Values are
read as YAML (``true``, ``null``, ``5e-4``, ``[q_proj, v_proj]``); lists may also be given
comma-separated. Unknown keys, wrong types and bad values are all reported in one `ConfigError`.

    config = load_config(["--config", "configs/llm_metamath.yaml", "--rho", "0", "--training.epochs", "1"])
    config.lora.rank, config.flat_lora.rho, config.save_yaml(path)
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import yaml

from flatlora_diffusion.files import write_text
from flatlora_diffusion.flat_lora import FlatLoraConfig
from flatlora_diffusion.typed_config import help_field as _f
from flatlora_diffusion.typed_config import type_ok as _type_ok

DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
TEMPLATE_NAMES = ("metamath", "gsm8k", "metamath_reference", "gsm8k_reference", "code_feedback", "wizardlm")  # see `flatlora_diffusion.llm.data.TEMPLATES`
TARGET_PRESETS = ("qv", "all")


class LLMError(ValueError):
    """Bad input to the LLM recipe: the message names the flag or file, the bad value and the fix."""


class ConfigError(LLMError):
    """One or more invalid settings; the message lists every problem, one per line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("Invalid LLM training configuration:\n  - " + "\n  - ".join(self.errors))


# ---------------------------------------------------------------------------------------------
# Type checks from the annotations: str, int, float, bool, `X | None`, `list[str]`, `str | list[str]`


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               type(None): "null", list[str]: "a list of strings"}


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return _TYPE_NAMES.get(hint, str(hint))


def _coerce(value, hint):
    """Numeric strings for number fields (PyYAML reads `5e-4` as a string); comma lists for list fields."""
    args = set(typing.get_args(hint)) or {hint}
    if isinstance(value, str):
        if float in args and int not in args:
            try:
                return float(value)
            except ValueError:
                return value
        if list[str] in args and ("," in value or str not in args):
            return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, int) and not isinstance(value, bool) and float in args and int not in args:
        return float(value)
    return value


@dataclass
class _Section:
    """Base of the sections: the loader checks the types from the annotations, then calls `check()`."""

    def check(self) -> list[str]:
        """Value errors of the section (its types are checked before), each naming `section.field`."""
        return []


def _positive(obj, section: str, *names: str, allow_zero: bool = False) -> list[str]:
    errors = []
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            errors.append(f"`{section}.{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    return errors


# ---------------------------------------------------------------------------------------------
# The sections


@dataclass
class ModelSettings(_Section):
    """The base causal LM (any `AutoModelForCausalLM`)."""

    name_or_path: str | None = _f(None, "Base model: hub id (`meta-llama/Llama-2-7b-hf`) or local folder. Required.")
    dtype: str = _f("bfloat16", "Precision of the frozen base weights; LoRA weights are always fp32 "
                               "(paper: bf16 base, fp32 adapters).", choices=DTYPES)
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    attn_implementation: str | None = _f(None, "`sdpa`, `eager` or `flash_attention_2`; default: transformers' choice.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (needed by some architectures).")

    def check(self) -> list[str]:
        errors = []
        if not self.name_or_path or not self.name_or_path.strip():
            errors.append("`model.name_or_path` is required: a hub id or a local folder "
                          "(`--model.name_or_path meta-llama/Llama-2-7b-hf`).")
        if self.dtype not in DTYPES:
            errors.append(f"`model.dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        return errors


@dataclass
class LoraSettings(_Section):
    """The LoRA adapters (peft)."""

    rank: int = _f(8, "LoRA rank r (paper: 8).")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA). Paper: 16.")
    dropout: float = _f(0.05, "Dropout on the LoRA branch input.")
    targets: str | list[str] = _f(
        "qv", "Layers that get LoRA: `qv` (`q_proj`, `v_proj`), `all` (every linear layer except `lm_head` and "
              "the embeddings) or a list of module names (`[q_proj, k_proj, v_proj, o_proj]`)."
    )
    modules_to_save: list[str] | None = _f(
        None, "Layers trained in full and saved with the adapter, e.g. `[lm_head]` (new tokens, or the demo's "
              "random base); Flat-LoRA does not perturb them. null: none (the paper)."
    )
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = _f(False, "DoRA (weight-decomposed LoRA); composes with Flat-LoRA.")
    loraplus_lr_ratio: float | None = _f(
        None, "LoRA+: the B matrices learn `ratio` times faster than A (LoRA+ paper: 16). null: plain AdamW. "
              "Applies together with Flat-LoRA."
    )

    def check(self) -> list[str]:
        errors = []
        if self.rank < 1:
            errors.append(f"`lora.rank` must be an integer >= 1, got {self.rank}.")
        errors += _positive(self, "lora", "alpha")
        if not 0 <= self.dropout < 1:
            errors.append(f"`lora.dropout` must be in [0, 1), got {self.dropout}.")
        if isinstance(self.targets, str) and self.targets not in TARGET_PRESETS:
            errors.append(f"`lora.targets` must be `qv`, `all` or a list of module names, got {self.targets!r}.")
        if isinstance(self.targets, list) and not [t for t in self.targets if t.strip()]:
            errors.append("`lora.targets` is an empty list; name at least one module, or use `qv` / `all`.")
        if self.loraplus_lr_ratio is not None and not (math.isfinite(self.loraplus_lr_ratio)
                                                       and self.loraplus_lr_ratio >= 1):
            errors.append(f"`lora.loraplus_lr_ratio` must be >= 1 (LoRA+ speeds up B) or null, "
                          f"got {self.loraplus_lr_ratio}.")
        return errors


@dataclass
class DataSettings(_Section):
    """Training data: a hub dataset or local JSON / JSONL / Parquet files, rendered by a prompt template."""

    train: str | None = _f(None, "Training data: hub dataset (`meta-math/MetaMathQA`) or a local .json/.jsonl/"
                                 ".parquet file with the template's fields. Required.")
    template: str = _f("metamath", "Prompt template: `metamath` (query/response), `gsm8k` (question/answer), their "
                                   "`*_reference` twins in the Flat-LoRA reference's `Q: …\\nA: ` layout, "
                                   "`code_feedback` (messages), `wizardlm` (conversations or instruction/output). "
                                   "See `flatlora_diffusion.llm.data`.", choices=TEMPLATE_NAMES)
    config_name: str | None = _f(None, "Hub dataset configuration name, if it has several.")
    split: str = _f("train", "Hub dataset split.")
    type_filter: str | None = _f(None, "Keep only rows whose `type` field contains this text (MetaMathQA: `GSM`).")
    max_length: int = _f(512, "Drop examples longer than this many tokens (prompt + response).")
    shuffle_seed: int = _f(42, "Seed of the shuffle that picks the first `num_train` examples.")
    num_train: int | None = _f(None, "Train on the first N examples after the shuffle and filters; null: all.")
    eval: str | None = _f(None, "Evaluation data (same fields as `train`); null: hold out `num_eval` examples.")
    eval_split: str = _f("test", "Hub split of `eval`.")
    num_eval: int = _f(0, "Without `eval`: the `num_eval` examples after the training ones are held out for "
                          "the evaluation loss. 0: no evaluation.")
    num_proc: int | None = _f(None, "Processes for tokenisation (`datasets.map`); null: one.")
    cache_dir: str | None = _f(None, "Cache folder of `datasets` (default: the Hugging Face cache).")

    def check(self) -> list[str]:
        errors = []
        if not self.train or not self.train.strip():
            errors.append("`data.train` is required: a hub dataset name or a .json/.jsonl/.parquet file.")
        if self.template not in TEMPLATE_NAMES:
            errors.append(f"`data.template` must be one of {', '.join(TEMPLATE_NAMES)}, got {self.template!r}.")
        if self.max_length < 8:
            errors.append(f"`data.max_length` must be >= 8 tokens, got {self.max_length}.")
        if self.num_train is not None and self.num_train < 1:
            errors.append(f"`data.num_train` must be >= 1 or null, got {self.num_train}.")
        if self.num_eval < 0:
            errors.append(f"`data.num_eval` must be >= 0, got {self.num_eval}.")
        if self.eval is not None and self.num_eval:
            errors.append("Give either `data.eval` (an evaluation file) or `data.num_eval` (held-out examples), "
                          "not both.")
        if self.num_proc is not None and self.num_proc < 1:
            errors.append(f"`data.num_proc` must be >= 1 or null, got {self.num_proc}.")
        return errors


@dataclass
class TrainingSettings(_Section):
    """The optimisation and the output (a transformers `Trainer` run)."""

    output_dir: str | None = _f(None, "Run folder: checkpoints, `adapter/`, `merged/`, `config.yaml`. Required.")
    epochs: float = _f(2.0, "Passes over the training data (paper: 2).")
    max_steps: int | None = _f(None, "Stop after this many optimiser steps (overrides `epochs`); null: use epochs.")
    learning_rate: float = _f(5e-4, "Peak learning rate (paper: 5e-4).")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warmup (paper: cosine).", choices=LR_SCHEDULERS)
    warmup_ratio: float = _f(0.03, "Fraction of the optimiser steps spent in linear warmup (paper: 0.03).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    effective_batch_size: int = _f(32, "Examples per optimiser step over all processes (paper: 32); gradient "
                                       "accumulation = effective / (per_device_batch_size x processes).")
    per_device_batch_size: int = _f(4, "Examples per forward pass on each process (micro-batch).")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward (less memory, ~30% slower).")
    eval_steps: int = _f(200, "Evaluate (when there is evaluation data) and save a checkpoint every N optimiser "
                              "steps.")
    save_total_limit: int | None = _f(2, "Checkpoints kept on disk (the best one is always kept); null: all.")
    load_best_at_end: bool = _f(True, "Finish with the checkpoint of lowest evaluation loss (needs evaluation data).")
    logging_steps: int = _f(10, "Log the loss (and `flat_lora/rho_t`) every N optimiser steps.")
    seed: int = _f(42, "Seed of the LoRA initialisation, dropout and data order.")
    resume: str | None = _f(None, "Resume from `latest` (the newest checkpoint in `output_dir`) or a checkpoint "
                                  "folder; null: start fresh.")
    merge: bool = _f(False, "Also export the base with the adapter merged in to `output_dir/merged` (for serving).")
    report_to: str = _f("none", "Experiment tracker.", choices=REPORT_TO)
    device: str = _f("auto", "`auto` (the accelerator when there is one) or `cpu`.", choices=("auto", "cpu"))
    dataloader_num_workers: int = _f(0, "Worker processes of the data loader.")

    def check(self) -> list[str]:
        errors = []
        if not self.output_dir or not self.output_dir.strip():
            errors.append("`training.output_dir` is required: the run folder (`--training.output_dir runs/metamath`).")
        errors += _positive(self, "training", "epochs", "learning_rate")
        errors += _positive(self, "training", "weight_decay", "max_grad_norm", allow_zero=True)
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"`training.max_steps` must be >= 1 or null, got {self.max_steps}.")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"`training.warmup_ratio` must be in [0, 1), got {self.warmup_ratio}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            errors.append(f"`training.lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)}, got "
                          f"{self.lr_scheduler!r}.")
        for name in ("effective_batch_size", "per_device_batch_size", "eval_steps", "logging_steps"):
            if getattr(self, name) < 1:
                errors.append(f"`training.{name}` must be >= 1, got {getattr(self, name)}.")
        if self.per_device_batch_size >= 1 and self.effective_batch_size % self.per_device_batch_size:
            errors.append(f"`training.effective_batch_size` ({self.effective_batch_size}) must be a multiple of "
                          f"`training.per_device_batch_size` ({self.per_device_batch_size}).")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            errors.append(f"`training.save_total_limit` must be >= 1 or null, got {self.save_total_limit}.")
        if self.dataloader_num_workers < 0:
            errors.append(f"`training.dataloader_num_workers` must be >= 0, got {self.dataloader_num_workers}.")
        if self.report_to not in REPORT_TO:
            errors.append(f"`training.report_to` must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}.")
        if self.device not in ("auto", "cpu"):
            errors.append(f"`training.device` must be `auto` or `cpu`, got {self.device!r}.")
        return errors


# `FlatLoraConfig` (the core's own dataclass) is the `flat_lora` section; its fields and checks are reused.
SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "lora": LoraSettings,
    "flat_lora": FlatLoraConfig,
    "data": DataSettings,
    "training": TrainingSettings,
}


@dataclass
class LLMTrainConfig:
    """The whole recipe configuration: one attribute per section."""

    model: ModelSettings
    lora: LoraSettings
    flat_lora: FlatLoraConfig
    data: DataSettings
    training: TrainingSettings

    def to_dict(self) -> dict:
        """Nested plain dict, section by section (the YAML layout)."""
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    def save_yaml(self, path: str | Path, header: str = "") -> Path:
        """Write the resolved config; `load_config(["--config", path])` rebuilds it."""
        text = "".join(f"# {line}\n" for line in header.splitlines())
        text += yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        return write_text(path, text)


# ---------------------------------------------------------------------------------------------
# Loading: YAML file + overrides → validated config, all errors at once


def _field_table() -> dict[str, dict[str, tuple]]:
    """section → field → (type hint, default)."""
    table = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        table[section] = {f.name: (hints[f.name], f) for f in fields(cls)}
    return table


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1)
    return f" Did you mean `{close[0]}`?" if close else ""


def _resolve_key(key: str, table: dict) -> tuple[str, str] | str:
    """`section.field` or a bare unique `field` → (section, field); an error message otherwise."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in table:
            return f"Unknown section `{section}` in `{key}`; sections: {', '.join(table)}.{_suggest(section, list(table))}"
        if name not in table[section]:
            return f"Unknown key `{key}`." + _suggest(key, [f"{section}.{n}" for n in table[section]])
        return section, name
    owners = [section for section, names in table.items() if key in names]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        return f"`--{key}` is ambiguous: use one of {', '.join(f'`--{s}.{key}`' for s in owners)}."
    every = [f"{s}.{n}" for s, names in table.items() for n in names]
    return f"Unknown option `--{key}`.{_suggest(key, every + [n for names in table.values() for n in names])}"


def _parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """(config path, [(key, raw value)], errors) from `--config FILE --key value --other=value ...`."""
    config, pairs, errors = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            errors.append(f"Unexpected argument `{arg}`: options are `--key value` (e.g. `--training.epochs 1`).")
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
                errors.append(f"`--{key}` needs a value (e.g. `--{key} true`).")
                i += 1
                continue
            value = argv[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            config = value
        else:
            pairs.append((key, value))
    return config, pairs, errors


def _parse_value(raw: str):
    """A command-line value read as YAML (`true`, `5e-4`, `[a, b]`, `null`/`none`); text otherwise."""
    if raw.strip().lower() in ("null", "none", "~"):
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if value is None or isinstance(value, dict) else value


def read_yaml(path: str | Path) -> tuple[dict, list[str]]:
    """The sections of a YAML config file, or the errors that make it unreadable."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        return {}, [f"Config file `{path}` cannot be read: {err.strerror or err}."]
    except yaml.YAMLError as err:
        return {}, [f"Config file `{path}` is not valid YAML: {err}."]
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        return {}, [f"Config file `{path}` must map sections ({', '.join(SECTIONS)}) to key: value tables."]
    return {k: v or {} for k, v in data.items()}, []


def load_config(argv: list[str] | None = None, base: dict | None = None) -> LLMTrainConfig:
    """Build and validate the config from `--config FILE` and `--key value` overrides (see the module doc).

    `base` (nested dict, same layout as the YAML) is applied before the file, for programmatic use.
    """
    table = _field_table()
    path, pairs, errors = _parse_overrides(list(argv or []))
    values: dict[str, dict] = {section: {} for section in SECTIONS}

    def put(section: str, name: str, value) -> None:
        values[section][name] = _coerce(value, table[section][name][0])

    for where, data in ([("`base`", base)] if base else []) + ([(f"`{path}`", None)] if path else []):
        if data is None:
            data, file_errors = read_yaml(path)
            errors += file_errors
        for section, entries in data.items():
            if section not in table:
                errors.append(f"{where}: unknown section `{section}`; sections: {', '.join(table)}."
                              + _suggest(section, list(table)))
                continue
            for name, value in entries.items():
                if name not in table[section]:
                    errors.append(f"{where}: unknown key `{section}.{name}`."
                                  + _suggest(f"{section}.{name}", [f"{section}.{n}" for n in table[section]]))
                    continue
                put(section, name, value)
    for key, raw in pairs:
        resolved = _resolve_key(key, table)
        if isinstance(resolved, str):
            errors.append(resolved)
            continue
        put(*resolved, _parse_value(raw))
    built = {}
    for section, cls in SECTIONS.items():
        built[section] = _build(section, cls, values[section], table[section], errors)
    errors += _cross_errors(built)
    if errors:
        raise ConfigError(errors)
    return LLMTrainConfig(**built)


def _build(section: str, cls: type, values: dict, table: dict, errors: list[str]):
    """One section from its values; type and value errors go to `errors` (None when there were any)."""
    type_errors = [f"`{section}.{name}` must be {_type_name(table[name][0])}, got {value!r}."
                   for name, value in values.items() if not _type_ok(value, table[name][0])]
    if type_errors:
        errors += type_errors
        return None
    if cls is FlatLoraConfig:
        try:
            return FlatLoraConfig(**values)
        except ValueError as err:  # the core lists its problems one per line, each naming the field
            errors += [f"`flat_lora.{line.strip()[1:]}" if line.strip().startswith("`") else line.strip()
                       for line in str(err).splitlines()[1:]]
            return None
    obj = cls(**values)
    section_errors = obj.check()
    errors += section_errors
    return None if section_errors else obj


def _cross_errors(built: dict) -> list[str]:
    """Rules that involve two sections (checked when both sections are valid on their own)."""
    errors = []
    data, training, flat = built["data"], built["training"], built["flat_lora"]
    if data is not None and training is not None and training.load_best_at_end \
            and data.eval is None and not data.num_eval:
        errors.append("`training.load_best_at_end` needs evaluation data: set `data.num_eval` (held-out "
                      "examples) or `data.eval` (a file), or set `training.load_best_at_end false`.")
    if flat is not None and training is not None and flat.total_steps is not None \
            and training.max_steps is not None and flat.total_steps > training.max_steps:
        errors.append(f"`flat_lora.total_steps` ({flat.total_steps}) exceeds `training.max_steps` "
                      f"({training.max_steps}): the noise would never reach full strength. Leave it null to "
                      "follow the run's optimiser steps.")
    return errors


def help_text() -> str:
    """Every key with its type, default and help, section by section (for `--help`)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            lines.append(f"  --{section}.{f.name} (default: {default!r})  {f.metadata.get('help', '')}")
    return "\n".join(lines)


__all__ = ["ConfigError", "DataSettings", "LLMError", "LLMTrainConfig", "LoraSettings", "ModelSettings",
           "TrainingSettings", "help_text", "load_config"]
