"""Typed settings of the eval commands: one dataclass per concern, checked once, errors reported together.

Each dataclass is both the library API and the command line: `add_arguments` turns its fields
into flags (``--dino_model``, also spelled ``--dino-model``) with the field's help text, and
`from_args` builds the validated config back, so defaults live in one place.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

from eval.dreambench import DEFAULT_IDENTIFIER
from eval.errors import EvalError
from flatlora_diffusion.typed_config import type_errors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConfigError(EvalError):
    """One or more invalid settings; the message lists every problem."""

    def __init__(self, name: str, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"Invalid {name} (each `name` is the flag `--name`):\n  - " + "\n  - ".join(errors))


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class _Config:
    """Base: type checks from the annotations, then the subclass's `_check`, all errors at once."""

    def __post_init__(self) -> None:
        errors = type_errors(self, lambda name: name, lambda hint: "of type " + _type_name(hint))
        if not errors:  # value checks assume the types are right
            errors = self._check()
        if errors:
            raise ConfigError(type(self).__name__, errors)

    def _check(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        """Plain dict of the settings (recorded in every report)."""
        return asdict(self)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field: ``--name`` and ``--name-with-dashes``; booleans are switches."""
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            hint = hints[f.name]
            kwargs: dict = {"dest": f.name, "help": f.metadata.get("help", "")}
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if hint is bool:
                kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
            else:
                base = _strip_none(hint)
                if typing.get_origin(base) is list:
                    kwargs["nargs"] = "+"
                    base = typing.get_args(base)[0]
                kwargs["type"] = base
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
                if default is MISSING:
                    kwargs["required"] = True
            if default is not MISSING:
                kwargs["default"] = default
                if default is not None and default is not False and default != "" and kwargs["help"]:
                    kwargs["help"] += f" (default: {default})"
            parser.add_argument(*flags, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """Build the config from parsed flags."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def _strip_none(hint):
    args = [h for h in typing.get_args(hint) if h is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _device_errors(device: str, dtype: str) -> list[str]:
    errors = []
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        return [f"`device` must be `auto`, `cpu`, `cuda`, `cuda:N` or `mps`, got {device!r}."]
    if resolved.type == "cuda" and not torch.cuda.is_available():
        errors.append(f"`device` is {device!r} but CUDA is not available here; use `--device cpu`.")
    if dtype not in DTYPES:
        errors.append(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    elif resolved.type == "cpu" and dtype == "float16":
        errors.append("`dtype` float16 is slow and unsupported for some ops on CPU; use float32 or bfloat16.")
    return errors


@dataclass
class ScoringConfig(_Config):
    """Models and runtime of the fidelity metrics (DINO, CLIP-I, CLIP-T)."""

    dino_model: str = field(
        default="facebook/dino-vits16",
        metadata=_help("DINO ViT: hub id or local folder (the protocol uses ViT-S/16; CLS token after the final LayerNorm)."),
    )
    clip_model: str = field(
        default="openai/clip-vit-base-patch32",
        metadata=_help("CLIP model for CLIP-I and CLIP-T: hub id or local folder (ViT-B/32 is the de-facto standard)."),
    )
    device: str = field(default="auto", metadata=_help("`auto` (CUDA if available), `cpu`, `cuda`, `cuda:N`, `mps`."))
    dtype: str = field(
        default="float32", metadata=_help("Precision of the metric models.", choices=tuple(DTYPES))
    )
    batch_size: int = field(default=32, metadata=_help("Images per forward pass of the metric models."))
    num_workers: int | None = field(
        default=None, metadata=_help("Threads that read, decode and preprocess images (default: CPU cores, at most 8).")
    )
    cache_dir: str | None = field(
        default=None,
        metadata=_help("Embedding cache (keyed by model weights, preprocessing and file content); "
                       "default `$XDG_CACHE_HOME/flatlora_eval/embeddings`."),
    )
    no_cache: bool = field(default=False, metadata=_help("Do not read or write the embedding cache."))
    identifier: str = field(
        default=DEFAULT_IDENTIFIER,
        metadata=_help("Rare-token identifier of the subject in the prompts (DreamBooth: `sks`)."),
    )
    keep_identifier: bool = field(
        default=False,
        metadata=_help("Score CLIP-T against the prompt *with* the identifier (default: removed, `a dog in the jungle`)."),
    )

    def _check(self) -> list[str]:
        errors = _device_errors(self.device, self.dtype)
        if self.batch_size < 1:
            errors.append(f"`batch_size` must be >= 1, got {self.batch_size}.")
        if self.num_workers is not None and self.num_workers < 1:
            errors.append(f"`num_workers` must be >= 1 (or unset), got {self.num_workers}.")
        for name in ("dino_model", "clip_model"):
            if not getattr(self, name).strip():
                errors.append(f"`{name}` must be a hub id or a folder, got an empty string.")
        if not self.identifier or any(c.isspace() for c in self.identifier):
            errors.append(f"`identifier` must be one word without spaces (e.g. `sks`), got {self.identifier!r}.")
        return errors


@dataclass
class FidelityConfig(ScoringConfig):
    """`python -m eval fidelity`: score one folder of generated images, or many through a manifest."""

    generated: str | None = field(default=None, metadata=_help("Folder of generated images of one subject."))
    reference: str | None = field(default=None, metadata=_help("Folder of the subject's real images."))
    prompts: str | None = field(
        default=None,
        metadata=_help("Prompts for CLIP-T: a text file with one prompt per image in natural file-name order, "
                       "or a JSON object {file name: prompt}."),
    )
    prompt_from_filenames: bool = field(
        default=False,
        metadata=_help("Take each image's prompt from its file name (`a_sks_dog_in_the_snow_003.png`: "
                       "underscores become spaces, a trailing index is dropped)."),
    )
    json: str | None = field(default=None, metadata=_help("Write the single-subject result to this JSON file."))
    manifest: str | None = field(
        default=None,
        metadata=_help("CSV or JSON(L) of rows `run, subject, generated, reference[, prompts][, live]` to score many "
                       "subjects and runs at once (paths relative to the manifest)."),
    )
    out: str | None = field(default=None, metadata=_help("Report folder of the manifest mode."))
    baseline: str | None = field(
        default=None, metadata=_help("Run the differences are taken against (default: the first run).")
    )

    def _check(self) -> list[str]:
        errors = super()._check()
        single = self.generated is not None or self.reference is not None
        if self.manifest is not None and single:
            errors.append("Use either `--manifest` or `--generated`/`--reference`, not both.")
        elif self.manifest is None and (self.generated is None or self.reference is None):
            errors.append("Give both `--generated DIR` and `--reference DIR` (or `--manifest FILE`).")
        if self.prompts is not None and self.prompt_from_filenames:
            errors.append("Use either `--prompts FILE` or `--prompt_from_filenames`, not both.")
        if self.manifest is not None and self.out is None:
            errors.append("`--manifest` needs `--out DIR` for the reports.")
        if self.manifest is not None and (self.prompts is not None or self.json is not None):
            errors.append("With `--manifest`, give prompts per row (`prompts` column) and use `--out`, not "
                          "`--prompts`/`--json`.")
        return errors


@dataclass
class DreamBenchConfig(ScoringConfig):
    """`python -m eval dreambench`: generate the protocol's images from trained adapters, score, compare."""

    base: str | None = field(default=None, metadata=_help("Base diffusers pipeline the adapters were trained on: "
                                                          "hub id, folder or `toy:sd`."))
    adapters: list[str] | None = field(
        default=None,
        metadata=_help("One RUN_DIR per run to compare, optionally named `NAME=RUN_DIR`. A run dir holds one trainer "
                       "output per subject (`RUN_DIR/<subject>/pytorch_lora_weights.safetensors`), or is itself one "
                       "adapter folder used for every subject; `NAME=none` is the base model without an adapter."),
    )
    dataset: str | None = field(default=None, metadata=_help("DreamBench folder (`prompts_and_classes.txt`, `images/`)."))
    subjects: list[str] | None = field(default=None, metadata=_help("Subjects to evaluate (default: all 30)."))
    out: str = field(default="outputs/dreambench", metadata=_help("Output folder: `images/` and the reports."))
    images_per_prompt: int = field(default=4, metadata=_help("Images per prompt and run (the protocol: 4)."))
    max_prompts: int | None = field(
        default=None, metadata=_help("Use only the first K prompts of each subject (quick checks; the protocol uses 25).")
    )
    seed: int = field(default=0, metadata=_help("Image i of prompt p uses seed `seed + p * images_per_prompt + i`, "
                                                "the same in every run (paired comparison)."))
    steps: int = field(default=50, metadata=_help("Denoising steps."))
    guidance_scale: float = field(default=7.5, metadata=_help("Classifier-free guidance scale."))
    negative_prompt: str | None = field(default=None, metadata=_help("Negative prompt for every image."))
    scheduler: str | None = field(default=None, metadata=_help("Sampler (see `flatlora_diffusion.sampling.SCHEDULERS`); "
                                                               "default: the pipeline's."))
    width: int | None = field(default=None, metadata=_help("Image width (default: the model's native size)."))
    height: int | None = field(default=None, metadata=_help("Image height (default: the model's native size)."))
    gen_batch_size: int = field(default=4, metadata=_help("Images per diffusion forward pass."))
    gen_dtype: str = field(default="auto", metadata=_help("Precision of the diffusion model; `auto`: float16 on CUDA, "
                                                          "float32 elsewhere.", choices=("auto", *DTYPES)))
    pres: bool = field(default=False, metadata=_help("Also compute PRES: DINO between images of the bare class prompt "
                                                     "(`a dog`, adapter active) and the real subject; lower = less drift."))
    pres_images: int = field(default=16, metadata=_help("Class-prompt images per subject and run for PRES."))
    div: bool = field(default=False, metadata=_help("Also compute DIV: 1 - mean pairwise DINO among images of the same "
                                                    "prompt; higher = more diverse."))
    baseline: str | None = field(default=None, metadata=_help("Run the differences are taken against "
                                                              "(default: the first)."))
    grid_prompts: int | None = field(default=None, metadata=_help("Rows of each sample grid (default: all prompts)."))

    def _check(self) -> list[str]:
        errors = super()._check()
        for name, example in (("base", "runwayml/stable-diffusion-v1-5"), ("dataset", "data/dreambench")):
            if not getattr(self, name):
                errors.append(f"`--{name}` is required (e.g. `--{name} {example}`).")
        if not self.adapters:
            errors.append("`--adapters` is required: one or more run folders, e.g. `--adapters lora=runs/lora "
                          "flat=runs/flat`.")
        for name in ("images_per_prompt", "steps", "gen_batch_size", "pres_images"):
            if getattr(self, name) < 1:
                errors.append(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        for name in ("max_prompts", "grid_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errors.append(f"`{name}` must be >= 1 (or unset), got {getattr(self, name)}.")
        if self.div and self.images_per_prompt < 2:
            errors.append("`--div` compares images of the same prompt: needs `--images_per_prompt` >= 2.")
        if self.seed < 0:
            errors.append(f"`seed` must be >= 0, got {self.seed}.")
        if self.gen_dtype not in ("auto", *DTYPES):
            errors.append(f"`gen_dtype` must be `auto` or one of {', '.join(DTYPES)}, got {self.gen_dtype!r}.")
        elif self.gen_dtype == "float16" and not errors and resolve_device(self.device).type == "cpu":
            errors.append("`gen_dtype` float16 does not run on CPU; use float32 or bfloat16 (or `--device cuda`).")
        return errors

    def generation_dtype(self) -> torch.dtype:
        """The diffusion model's dtype (`auto`: float16 on CUDA, float32 elsewhere)."""
        if self.gen_dtype != "auto":
            return DTYPES[self.gen_dtype]
        return torch.float16 if resolve_device(self.device).type == "cuda" else torch.float32


@dataclass
class LLMConfig(_Config):
    """A causal language model (hub id or folder), optionally with a trained LoRA adapter."""

    model: str | None = field(default=None, metadata=_help("Base causal LM: hub id or local folder."))
    adapter: str | None = field(default=None, metadata=_help("peft adapter folder to apply on the base model."))
    device: str = field(default="auto", metadata=_help("`auto` (CUDA if available), `cpu`, `cuda`, `cuda:N`."))
    dtype: str = field(default="float32", metadata=_help("Model precision.", choices=tuple(DTYPES)))
    batch_size: int = field(default=8, metadata=_help("Prompts per batched generate call (left-padded)."))
    max_new_tokens: int = field(default=256, metadata=_help("Generation budget per example."))
    limit: int | None = field(default=None, metadata=_help("Evaluate only the first N examples."))
    chat_template: bool = field(
        default=False, metadata=_help("Wrap each prompt as a user turn with the tokenizer's chat template.")
    )
    out: str | None = field(default=None, metadata=_help("Write the result JSON (and per-example JSONL next to it)."))

    def _check(self) -> list[str]:
        errors = []
        if self.model is None or not str(self.model).strip():
            errors.append("`model` is required: a hub id or a local folder (`--model PATH`).")
        errors += _device_errors(self.device, self.dtype)
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                errors.append(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.limit is not None and self.limit < 1:
            errors.append(f"`limit` must be >= 1, got {self.limit}.")
        return errors


@dataclass
class GSM8KConfig(LLMConfig):
    """`python -m eval gsm8k`: accuracy with batched greedy decoding."""

    data: str | None = field(
        default=None,
        metadata=_help("GSM8K JSONL (`question`, `answer` with `#### N`) or a hub dataset name such as `openai/gsm8k`."),
    )
    data_config: str | None = field(default="main", metadata=_help("Hub dataset config (GSM8K: `main`)."))
    split: str = field(default="test", metadata=_help("Hub dataset split."))
    num_fewshot: int = field(default=0, metadata=_help("Worked examples prepended to each question."))
    fewshot_data: str | None = field(
        default=None, metadata=_help("JSONL the few-shot examples come from (default: the first rows of `--data`, "
                                     "which are then not evaluated).")
    )
    extract: str = field(
        default="flexible",
        metadata=_help("`strict`: only `#### N` / `The answer is N` / `\\boxed{N}`; "
                       "`flexible`: else the last number in the answer.", choices=("strict", "flexible")),
    )
    protocol: str = field(
        default="project",
        metadata=_help("`project`: `Question: …\\nAnswer:` and the extraction of `--extract`; `reference`: the "
                       "Flat-LoRA reference's `Q: …\\nA: ` prompt and its extraction (the first `#### N`, digits "
                       "only). Train with the matching template (`metamath` / `metamath_reference`).",
                       choices=("project", "reference")),
    )

    def _check(self) -> list[str]:
        errors = super()._check()
        if self.data is None:
            errors.append("`data` is required: a GSM8K JSONL file or a hub dataset name (`--data openai/gsm8k`).")
        if self.num_fewshot < 0:
            errors.append(f"`num_fewshot` must be >= 0, got {self.num_fewshot}.")
        if self.extract not in ("strict", "flexible"):
            errors.append(f"`extract` must be `strict` or `flexible`, got {self.extract!r}.")
        if self.protocol not in ("project", "reference"):
            errors.append(f"`protocol` must be `project` or `reference`, got {self.protocol!r}.")
        return errors


@dataclass
class HumanEvalConfig(LLMConfig):
    """`python -m eval humaneval`: pass@1 of completions, executed in a sandboxed subprocess."""

    data: str | None = field(
        default=None,
        metadata=_help("HumanEval JSONL(.gz) (`task_id`, `prompt`, `test`, `entry_point`) or a hub dataset name "
                       "such as `openai/openai_humaneval`."),
    )
    split: str = field(default="test", metadata=_help("Hub dataset split."))
    max_new_tokens: int = field(default=512, metadata=_help("Generation budget per task."))
    timeout: float = field(default=10.0, metadata=_help("Wall-clock seconds per program before it is killed."))
    memory_mb: int = field(default=1024, metadata=_help("Address-space limit of each program, MiB."))
    workers: int = field(default=2, metadata=_help("Programs executed in parallel."))
    unsafe_sandbox: bool = field(
        default=False,
        metadata=_help("Run the programs even where bubblewrap cannot isolate them (Python-level guards only, not a "
                       "security boundary: use it only inside a disposable VM or container without network)."),
    )
    protocol: str = field(
        default="project",
        metadata=_help("`project`: the bare prompt, one greedy completion per task; `reference`: the Flat-LoRA "
                       "reference's scheme: the prompt inside an instruction with a ```python fence, the code taken "
                       "from the reply's fence, `--num_samples` sampled replies per task, pass@1 over them.",
                       choices=("project", "reference")),
    )
    num_samples: int = field(default=5, metadata=_help("`reference` protocol: sampled completions per task."))
    temperature: float = field(default=0.2, metadata=_help("`reference` protocol: sampling temperature."))
    top_p: float = field(default=0.95, metadata=_help("`reference` protocol: nucleus-sampling mass."))
    seed: int = field(default=0, metadata=_help("`reference` protocol: seed of the sampling."))
    instruction: str | None = field(
        default=None,
        metadata=_help("`reference` protocol: the instruction around each prompt, with `{prompt}` where the prompt "
                       "goes (default: `eval.humaneval.REFERENCE_INSTRUCTION`); pass the reference's own text to "
                       "match it exactly."),
    )

    def _check(self) -> list[str]:
        errors = super()._check()
        if self.data is None:
            errors.append("`data` is required: a HumanEval JSONL file or `--data openai/openai_humaneval`.")
        if self.protocol not in ("project", "reference"):
            errors.append(f"`protocol` must be `project` or `reference`, got {self.protocol!r}.")
        if self.num_samples < 1:
            errors.append(f"`num_samples` must be >= 1, got {self.num_samples}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            errors.append(f"`temperature` must be > 0 (the `reference` protocol samples), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            errors.append(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if self.instruction is not None and "{prompt}" not in self.instruction:
            errors.append("`instruction` must contain `{prompt}`, where each task's prompt is put.")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            errors.append(f"`timeout` must be a positive number of seconds, got {self.timeout}.")
        if self.memory_mb < 64:
            errors.append(f"`memory_mb` must be >= 64 (the interpreter alone needs ~30 MiB), got {self.memory_mb}.")
        if self.workers < 1:
            errors.append(f"`workers` must be >= 1, got {self.workers}.")
        return errors

