"""Folders of images to score: prompts for each image, one (run, subject) job, and manifests of many.

    job = prepare_folders("gen/dog", "data/dreambench/images/dog", prompts_file="prompts.txt")
    jobs = prepare_manifest(read_manifest("runs.csv"))   # run,subject,generated,reference[,prompts][,live]

Everything is checked here, before a model loads: missing folders, empty folders, prompt files
whose length does not match the images, duplicate rows.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from eval.errors import EvalError
from eval.fidelity import FidelityScorer, ReferenceScore, SubjectScore
from eval.images import ImageFolder, list_images


def prompt_from_filename(path: str | Path) -> str:
    """``a_sks_dog_in_the_snow_003.png`` → ``a sks dog in the snow`` (trailing index dropped)."""
    stem = re.sub(r"[_\-\s]*\d+$", "", Path(path).stem)
    return " ".join(stem.replace("_", " ").split())


def read_prompts(path: str | Path, files: list[Path], flag: str = "--prompts") -> list[str]:
    """Prompts for `files`: a JSON object {file name: prompt}, or one line per file in natural order."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"`{flag}` file `{path}` does not exist.")
    if path.suffix.lower() == ".json":
        mapping = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(mapping, dict):
            raise EvalError(f"`{flag}` JSON `{path}` must be an object {{\"file name\": \"prompt\"}}.")
        missing = [f.name for f in files if f.name not in mapping]
        if missing:
            raise EvalError(
                f"`{flag}` JSON `{path}` has no prompt for {len(missing)} image(s): {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}."
            )
        return [str(mapping[f.name]) for f in files]
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != len(files):
        raise EvalError(
            f"`{flag}` file `{path}` has {len(lines)} prompts but the folder has {len(files)} images. Give one "
            "prompt per image, in natural file-name order (img2 before img10), or a JSON {file name: prompt}."
        )
    return lines


@dataclass
class FolderJob:
    """A folder of generated images, the subject's real images and the prompts, checked before scoring."""

    run: str
    subject: str
    generated: ImageFolder
    reference: ImageFolder
    prompts: list[str] | None
    live: bool | None = None


def prepare_folders(
    generated_dir: str | Path,
    reference_dir: str | Path,
    *,
    prompts_file: str | Path | None = None,
    prompt_from_filenames: bool = False,
    run: str | None = None,
    subject: str | None = None,
    live: bool | None = None,
) -> FolderJob:
    """List both folders and line the prompts up with the generated images (errors before any model runs)."""
    ignore = (Path(prompts_file),) if prompts_file is not None else ()
    gen = list_images(generated_dir, "--generated", ignore)
    ref = list_images(reference_dir, "--reference")
    prompts = None
    if prompts_file is not None:
        prompts = read_prompts(prompts_file, gen.files)
    elif prompt_from_filenames:
        prompts = [prompt_from_filename(p) for p in gen.files]
        empty = [p.name for p, text in zip(gen.files, prompts, strict=True) if not text]
        if empty:
            raise EvalError(
                f"`--prompt_from_filenames`: {len(empty)} file name(s) hold no prompt ({', '.join(empty[:3])}); "
                "name images like `a_sks_dog_in_the_snow_003.png` or pass `--prompts FILE`."
            )
    return FolderJob(
        run=run or Path(generated_dir).resolve().name,
        subject=subject or Path(reference_dir).resolve().name,
        generated=gen,
        reference=ref,
        prompts=prompts,
        live=live,
    )


# --- manifest mode -------------------------------------------------------------------------------

MANIFEST_COLUMNS = ("run", "subject", "generated", "reference")


@dataclass
class ManifestRow:
    """One (run, subject) to score."""

    run: str
    subject: str
    generated: Path
    reference: Path
    prompts: Path | None = None
    prompt_from_filenames: bool = False
    live: bool | None = None


def _as_bool(value, where: str) -> bool | None:
    if value in (None, ""):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "live"):
        return True
    if text in ("0", "false", "no", "object"):
        return False
    raise EvalError(f"{where}: expected true/false, got {value!r}.")


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Rows of a CSV, JSON (list) or JSONL manifest; every problem is reported at once.

    Folders and prompt files are checked by `prepare_manifest`.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"`--manifest` file `{path}` does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        raw = list(csv.DictReader(text.splitlines()))
    elif path.suffix.lower() in (".jsonl", ".json"):
        try:
            raw = json.loads(text) if path.suffix.lower() == ".json" else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise EvalError(f"`--manifest` `{path}` is not valid JSON: {err}.") from err
    else:
        raise EvalError(f"`--manifest` `{path}` must be .csv, .json or .jsonl.")
    if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) for r in raw):
        raise EvalError(f"`--manifest` `{path}` must hold a non-empty list of rows (objects).")
    rows, errors, seen = [], [], set()
    for i, entry in enumerate(raw, start=1):
        where = f"`{path.name}` row {i}"
        entry = {k: ("" if v is None else v if isinstance(v, bool) else str(v)) for k, v in entry.items()}
        missing = [c for c in MANIFEST_COLUMNS if not entry.get(c, "").strip()]
        if missing:
            errors.append(f"{where}: missing {', '.join(f'`{c}`' for c in missing)}.")
            continue
        resolve = lambda value: (path.parent / Path(value).expanduser()).resolve()  # noqa: E731
        try:
            row = ManifestRow(
                run=entry["run"].strip(),
                subject=entry["subject"].strip(),
                generated=resolve(entry["generated"]),
                reference=resolve(entry["reference"]),
                prompts=resolve(entry["prompts"]) if entry.get("prompts", "").strip() else None,
                prompt_from_filenames=bool(_as_bool(entry.get("prompt_from_filenames"), where)),
                live=_as_bool(entry.get("live"), where),
            )
        except EvalError as err:
            errors.append(str(err))
            continue
        if (row.run, row.subject) in seen:
            errors.append(f"{where}: run `{row.run}` and subject `{row.subject}` appear twice.")
        seen.add((row.run, row.subject))
        rows.append(row)
    if errors:
        raise EvalError(f"Invalid `--manifest` `{path}`:\n  - " + "\n  - ".join(errors))
    return rows


def prepare_manifest(rows: list[ManifestRow]) -> list[FolderJob]:
    """Check every row's folders and prompts before scoring anything; all problems are raised together."""
    jobs, errors = [], []
    for row in rows:
        try:
            jobs.append(prepare_folders(
                row.generated, row.reference, prompts_file=row.prompts,
                prompt_from_filenames=row.prompt_from_filenames, run=row.run, subject=row.subject, live=row.live,
            ))
        except EvalError as err:
            errors.append(f"run `{row.run}`, subject `{row.subject}`: {err}")
    if errors:
        raise EvalError("Invalid `--manifest` rows:\n  - " + "\n  - ".join(errors))
    return jobs


def score_job(scorer: FidelityScorer, job: FolderJob) -> tuple[SubjectScore, ReferenceScore]:
    """Score one prepared folder pair: the run's row and the subject's real-images row."""
    score = scorer.score(job.run, job.subject, job.generated.files, job.reference.files, job.prompts,
                         live=job.live, skipped=job.generated.skipped + job.reference.skipped)
    return score, scorer.reference_score(job.subject, job.reference.files, job.live)


def score_jobs(scorer: FidelityScorer, jobs: list[FolderJob]) -> tuple[list[SubjectScore], list[ReferenceScore]]:
    """Score every job; the real-images row is computed once per subject."""
    scores, references = [], {}
    for job in tqdm(jobs, desc="scoring", unit="subject", disable=None):
        score, ref = score_job(scorer, job)
        scores.append(score)
        references.setdefault(job.subject, ref)
    return scores, list(references.values())
