"""What a ρ sweep runs: its settings, its grid of (ρ, seed, subject) runs, and their trainer commands.

The settings that every run shares (the base YAML's content, the extra trainer flags, the evaluation
settings) are written to ``OUT/sweep.json`` on the first start; a later start with other
shared settings is refused, naming the difference, so one report never mixes runs made differently.
The grid itself (ρ values, seeds, subjects) may grow between starts: finished runs are kept. The
flatness settings may change too: the meter reruns for them (its results are not mixed either).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from flatlora_diffusion.files import write_text

IDENTIFIER = "sks"
PROMPTS_FILE = "prompts_and_classes.txt"
# Trainer flags the sweep sets per run; a user's extra flags may not override them.
SWEEP_FLAGS = ("output_dir", "instance_data_dir", "instance_prompt", "seed", "rho", "resume_from_checkpoint",
               "class_data_dir")


class SweepError(ValueError):
    """A sweep cannot start or resume as asked; the message names the flag or file and the fix."""


@dataclass(frozen=True)
class Subject:
    """One subject: its instance folder and class noun (from the dataset's `prompts_and_classes.txt`)."""

    name: str
    folder: Path
    noun: str

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {IDENTIFIER} {self.noun}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.noun}"


@dataclass(frozen=True)
class RunKey:
    """One training run of the grid."""

    rho: float
    seed: int
    subject: str

    @property
    def group(self) -> str:
        """The eval run name: every subject of one (ρ, seed)."""
        return f"rho{self.rho:g}-seed{self.seed}"


@dataclass
class SweepConfig:
    """A ρ sweep: train every (ρ, seed, subject), score it on the DreamBench protocol, measure flatness."""

    config: Path
    """The trainer's base YAML (`train_dreambooth_flatlora.py --config`); every run starts from it."""
    rhos: list[float]
    """Flat-LoRA noise strengths; 0 is plain LoRA and the baseline of the paired differences."""
    seeds: list[int]
    """Training seeds (`--seed`); the evaluation images use the same seeds in every run (paired)."""
    subjects: list[Path]
    """Instance image folders inside one DreamBench-layout dataset (`ROOT/images/<subject>/`)."""
    out: Path
    """Output folder: `runs/`, `eval/`, `flatness/`, `report.md`, `report.json`, PNGs."""
    train_args: list[str] = field(default_factory=list)
    """Extra trainer flags for every run (e.g. `--max_train_steps 1600 --with_prior_preservation`)."""
    jobs: int = 1
    """Trainings run at once (one CPU thread each on CPU)."""
    images_per_prompt: int = 4
    """Evaluation images per prompt and run (the DreamBench protocol: 4)."""
    max_prompts: int | None = None
    """Use only the first K prompts of each subject (quick checks; the protocol uses 25)."""
    eval_seed: int = 0
    """Seed of the evaluation images (`python -m eval dreambench --seed`)."""
    dino_model: str = "facebook/dino-vits16"
    """DINO model for the DINO score (`toy:vit` on the toy world)."""
    clip_model: str = "openai/clip-vit-base-patch32"
    """CLIP model for CLIP-I and CLIP-T (`toy:clip` on the toy world)."""
    device: str = "auto"
    """Device of evaluation and flatness (`auto`, `cpu`, `cuda`)."""
    oracle: str = "auto"
    """`auto`: score with the toy world's oracle when every subject is a toy-world subject; `none`: never."""
    flatness: bool = True
    """Run the flatness meter on every adapter of a subject."""
    radii: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2])
    """Flatness meter radii."""
    draws: int = 8
    """Flatness meter noise draws per radius."""
    directions: int = 2
    """Flatness meter random directions."""

    def __post_init__(self) -> None:
        self.config, self.out = Path(self.config), Path(self.out)
        self.subjects = [Path(s) for s in self.subjects]
        errors = []
        if not self.config.is_file():
            errors.append(f"`--config`: `{self.config}` does not exist; pass the trainer YAML every run starts from.")
        if not self.rhos:
            errors.append("`--rho`: give at least one value (0 = plain LoRA).")
        bad = [r for r in self.rhos if not (math.isfinite(r) and 0 <= r <= 1)]
        if bad:
            errors.append(f"`--rho` must lie in [0, 1]; got {', '.join(map(str, bad))}.")
        for name, values in (("--rho", self.rhos), ("--seeds", self.seeds)):
            if len(set(values)) != len(values):
                errors.append(f"`{name}` repeats a value: {values}.")
        if not self.seeds:
            errors.append("`--seeds`: give at least one training seed.")
        if not self.subjects:
            errors.append("`--subjects`: give at least one instance image folder.")
        if self.jobs < 1 or self.images_per_prompt < 1 or self.draws < 1 or self.directions < 0:
            errors.append("`--jobs`, `--images_per_prompt` and `--draws` must be >= 1, `--directions` >= 0.")
        if self.oracle not in ("auto", "none"):
            errors.append(f"`--oracle` must be `auto` or `none`, got {self.oracle!r}.")
        if any(not (0 <= r <= 1) for r in self.radii):
            errors.append(f"`--radii` must lie in [0, 1]; got {self.radii}.")
        for arg in self.train_args:
            if arg.startswith("--") and arg[2:].split("=")[0] in SWEEP_FLAGS:
                errors.append(f"Trainer flag `{arg}` is set by the sweep for every run; remove it "
                              "(use `--rho`, `--seeds`, `--subjects`).")
        if errors:
            raise SweepError("Cannot start the sweep:\n  - " + "\n  - ".join(errors))

    def shared_settings(self) -> dict:
        """What every run of this sweep must share: compared with `sweep.json` on every start."""
        text = self.config.read_text()
        return {
            "config": {"path": str(self.config), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                       "values": yaml.safe_load(text)},
            "train_args": self.train_args,
            "eval": {"images_per_prompt": self.images_per_prompt, "max_prompts": self.max_prompts,
                     "seed": self.eval_seed, "dino_model": self.dino_model, "clip_model": self.clip_model,
                     "oracle": self.oracle},
        }

    def grid(self) -> list[RunKey]:
        """Every run, ρ-major (all runs of one ρ and seed are one evaluation run)."""
        return [RunKey(r, s, subject.name) for r in self.rhos for s in self.seeds for subject in self.subjects]

    def run_dir(self, key: RunKey) -> Path:
        return self.out / "runs" / f"rho={key.rho:g}" / f"seed={key.seed}" / key.subject

    def group_dir(self, rho: float, seed: int) -> Path:
        return self.out / "runs" / f"rho={rho:g}" / f"seed={seed}"

    @property
    def with_prior(self) -> bool:
        return "--with_prior_preservation" in self.train_args or _yaml_flag(self.config, "with_prior_preservation")


def _yaml_flag(path: Path, name: str) -> bool:
    return bool((yaml.safe_load(path.read_text()) or {}).get(name))


def dataset_root(subjects: list[Path]) -> Path:
    """The one DreamBench folder (`prompts_and_classes.txt`, `images/`) all subject folders lie in."""
    roots = set()
    for folder in subjects:
        if not folder.is_dir():
            raise SweepError(f"`--subjects`: `{folder}` is not a folder; give instance image folders "
                             f"(`DATASET/images/<subject>`).")
        root = folder.resolve().parent.parent
        if folder.resolve().parent.name != "images" or not (root / PROMPTS_FILE).is_file():
            raise SweepError(f"`--subjects`: `{folder}` is not inside a DreamBench-layout dataset "
                             f"(`DATASET/images/<subject>/` beside `DATASET/{PROMPTS_FILE}`).")
        roots.add(root)
    if len(roots) > 1:
        raise SweepError(f"`--subjects` come from {len(roots)} datasets ({', '.join(map(str, sorted(roots)))}); "
                         "one sweep scores one dataset.")
    return roots.pop()


def resolve_subjects(folders: list[Path]) -> tuple[Path, list[Subject]]:
    """The dataset root and each subject's class noun; unknown subjects are refused, all at once."""
    from eval.dreambench import DreamBench
    from eval.errors import EvalError

    root = dataset_root(folders)
    try:
        bench = DreamBench(root)
    except EvalError as err:
        raise SweepError(f"`--subjects`: {err}") from None
    unknown = [f.name for f in folders if f.name not in bench.subjects]
    if unknown:
        raise SweepError(f"`--subjects` {', '.join(unknown)} are not listed in `{root / PROMPTS_FILE}` "
                         f"(known: {', '.join(bench.subjects)}).")
    subjects = []
    for folder in folders:
        if not any(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in folder.iterdir()):
            raise SweepError(f"`--subjects`: `{folder}` holds no images.")
        subjects.append(Subject(folder.name, folder, bench.subjects[folder.name].class_noun))
    return root, subjects


def train_flags(config: SweepConfig, key: RunKey, subject: Subject) -> list[str]:
    """The trainer command line of one run (resumes its own checkpoints after a kill)."""
    flags = ["--config", str(config.config), "--output_dir", str(config.run_dir(key)),
             "--instance_data_dir", str(subject.folder), "--instance_prompt", subject.instance_prompt,
             "--seed", str(key.seed), "--rho", f"{key.rho:g}", "--report_to", "none",
             "--validation_prompt", "none", "--validation_extra_prompts", "", *config.train_args]
    if config.with_prior:
        flags += ["--class_data_dir", str(config.out / "class_images" / f"seed={key.seed}" / key.subject)]
        if "--class_prompt" not in config.train_args:
            flags += ["--class_prompt", subject.class_prompt]
    return [*flags, "--resume_from_checkpoint", "latest"]


def check_settings(config: SweepConfig) -> None:
    """Write `sweep.json` on the first start; refuse a start whose shared settings differ from it."""
    path = config.out / "sweep.json"
    settings = config.shared_settings()
    if path.is_file():
        saved = json.loads(path.read_text())
        differences = _differences(saved.get("shared", {}), settings)
        if differences:
            raise SweepError(f"`{config.out}` holds a sweep made with other settings ({'; '.join(differences)}). "
                             "Use another `--out`, or the same settings to resume it.")
    grid = {"rhos": sorted(set(config.rhos)), "seeds": sorted(set(config.seeds)),
            "subjects": sorted({s.name for s in config.subjects})}
    if path.is_file():
        old = json.loads(path.read_text()).get("grid", {})
        grid = {k: sorted(set(v) | set(old.get(k, []))) for k, v in grid.items()}
    write_text(path, json.dumps({"shared": settings, "grid": grid}, indent=1, default=str) + "\n")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, name + ".")
        elif a != b and not name.endswith(("sha256", "config.path")):
            out.append(f"`{name}`: {a!r} before, {b!r} now")
    return out


def run_differences(run_dir: Path, flags: list[str]) -> list[str]:
    """Settings of the run in `run_dir` (its `config.yaml`) that differ from what `flags` would train."""
    from flatlora_diffusion.dreambooth import load_config

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return []
    saved = yaml.safe_load(saved_file.read_text()) or {}
    planned = load_config(flags).to_flags()
    ignored = {"resume_from_checkpoint"}
    if planned.get("max_train_steps") is not None:
        ignored.add("num_train_epochs")  # the trainer writes the epochs it derived from the step count
    return [f"`{k}`: {saved[k]!r} in the run, {v!r} in this sweep" for k, v in planned.items()
            if k not in ignored and v is not None and k in saved and _normal(saved[k]) != _normal(v)]


def _normal(value):
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def describe(config: SweepConfig) -> dict:
    """The sweep's settings for the report."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()} | {
        "subjects": [str(s) for s in config.subjects]}
