"""Fidelity reports: per-subject rows → mean ± s.e. over subjects per run, differences to a baseline, files.

Aggregation is always per subject first: a run's DINO is the mean over subjects of each
subject's all-pairs mean, and its standard error is over subjects (n = number of subjects).
Differences to the baseline are paired over the subjects both runs scored.

`FidelityReport.write(out)` writes, each file atomically (temp file + rename):
``results.json`` (every number, settings, model ids, preprocessing, versions),
``per_subject.csv``, ``summary.csv``, ``report.md``, ``metrics.png`` and ``grid_<subject>.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from eval import charts
from eval.environment import environment
from eval.errors import EvalError
from eval.fidelity import ReferenceScore, SubjectScore
from eval.metrics import mean_and_sem
from flatlora_diffusion.files import save_image, write_text

METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}
REAL_IMAGES = "Real images"
GROUPS = {"all": "All subjects", "objects": "Objects", "live": "Live subjects"}
RESULTS_FORMAT = 1


@dataclass(frozen=True)
class Stat:
    """Mean, standard error of the mean and number of subjects behind them."""

    mean: float
    sem: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        if not values:
            return None
        mean, sem = mean_and_sem(values)
        return cls(mean, sem, len(values))

    def format(self, signed: bool = False, digits: int = 3) -> str:
        """``0.668 ± 0.012`` (no ± for a single subject)."""
        text = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        return text if math.isnan(self.sem) else f"{text} ± {self.sem:.{digits}f}"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "sem": None if math.isnan(self.sem) else self.sem, "n_subjects": self.n}


def _in_group(live: bool | None, group: str) -> bool:
    return group == "all" or (group == "live" and live is True) or (group == "objects" and live is False)


class FidelityReport:
    """Per-subject scores of one or more runs, the real-images rows, and everything needed to reproduce them."""

    def __init__(
        self,
        scores: list[SubjectScore],
        references: list[ReferenceScore],
        settings: dict,
        baseline: str | None = None,
    ) -> None:
        if not scores:
            raise EvalError("Nothing to report: no subject was scored.")
        self.scores = scores
        self.references = references
        self.settings = settings
        self.runs = list(dict.fromkeys(s.run for s in scores))
        if baseline is not None and baseline not in self.runs:
            raise EvalError(f"`--baseline` `{baseline}` is not one of the runs: {', '.join(self.runs)}.")
        self.baseline = baseline or self.runs[0]
        self.metrics = [m for m in METRICS if any(getattr(s, m) is not None for s in scores)]

    # --- numbers ---------------------------------------------------------------------------------

    def groups(self) -> list[str]:
        """`all`, plus `objects` / `live` when some subjects are known to be in them."""
        return [g for g in GROUPS if any(_in_group(s.live, g) for s in self.scores)]

    def summary(self, group: str = "all") -> dict[str, dict[str, Stat | None]]:
        """run → metric → mean ± s.e. over the run's subjects in `group`."""
        table = {}
        for run in self.runs:
            rows = [s for s in self.scores if s.run == run and _in_group(s.live, group)]
            table[run] = {m: Stat.of([getattr(s, m) for s in rows if getattr(s, m) is not None]) for m in self.metrics}
        return table

    def real_summary(self, group: str = "all") -> dict[str, Stat | None]:
        """The real-images row: metric → mean ± s.e. over subjects (DINO and CLIP-I only)."""
        rows = [r for r in self.references if _in_group(r.live, group)]
        return {m: Stat.of([getattr(r, m) for r in rows if getattr(r, m, None) is not None])
                for m in ("dino", "clip_i")}

    def differences(self, group: str = "all") -> dict[str, dict[str, Stat | None]]:
        """run → metric → (run − baseline), mean ± paired s.e. over the subjects both runs have."""
        base = {s.subject: s for s in self.scores if s.run == self.baseline and _in_group(s.live, group)}
        table = {}
        for run in self.runs:
            if run == self.baseline:
                continue
            rows = [s for s in self.scores if s.run == run and s.subject in base]
            table[run] = {
                m: Stat.of([getattr(s, m) - getattr(base[s.subject], m) for s in rows
                            if getattr(s, m) is not None and getattr(base[s.subject], m) is not None])
                for m in self.metrics
            }
        return table

    # --- serialisation ---------------------------------------------------------------------------

    def to_json(self) -> dict:
        """Every number and setting; `from_json` reads it back."""
        summary = {}
        for group in self.groups():
            diffs = self.differences(group)
            summary[group] = {
                "real_images": {m: s.to_dict() if s else None for m, s in self.real_summary(group).items()},
                "runs": {
                    run: {m: {**(s.to_dict() if s else {}),
                              "diff_to_baseline": (diffs[run][m].to_dict() if run in diffs and diffs[run][m] else None)}
                          for m, s in stats.items()}
                    for run, stats in self.summary(group).items()
                },
            }
        return {
            "format": RESULTS_FORMAT,
            "baseline": self.baseline,
            "runs": self.runs,
            "metrics": self.metrics,
            "summary": summary,
            "settings": self.settings,
            "environment": environment(),
            "real_images": [r.to_dict() for r in self.references],
            "subjects": [s.to_dict() for s in self.scores],
        }

    @classmethod
    def from_json(cls, data: dict, baseline: str | None = None) -> FidelityReport:
        if data.get("format") != RESULTS_FORMAT or "subjects" not in data:
            raise EvalError("Not an eval results file (expected `results.json` written by `python -m eval`).")
        return cls(
            [SubjectScore.from_dict(s) for s in data["subjects"]],
            [ReferenceScore(**r) for r in data.get("real_images", [])],
            data.get("settings", {}),
            baseline if baseline is not None else data.get("baseline"),
        )

    def per_subject_rows(self) -> list[dict]:
        """One row per (run, subject), plus the real-images rows."""
        columns = ["run", "subject", "class", "live", *self.metrics, "n_generated", "n_reference", "n_skipped"]
        rows = [{"run": REAL_IMAGES, "subject": r.subject, "live": r.live, "dino": r.dino, "clip_i": r.clip_i,
                 "n_reference": r.n_reference} for r in self.references]
        rows += [{"run": s.run, "subject": s.subject, "class": s.class_noun, "live": s.live,
                  **{m: getattr(s, m) for m in self.metrics}, "n_generated": s.n_generated,
                  "n_reference": s.n_reference, "n_skipped": len(s.skipped)} for s in self.scores]
        return [{c: row.get(c) for c in columns} for row in rows]

    def summary_rows(self) -> list[dict]:
        """One row per (group, run, metric) with mean, s.e., n and the difference to the baseline."""
        rows = []
        for group in self.groups():
            for metric, stat in self.real_summary(group).items():
                if stat:
                    rows.append({"group": group, "run": REAL_IMAGES, "metric": metric, "mean": stat.mean,
                                 "sem": stat.to_dict()["sem"], "n_subjects": stat.n})
            diffs = self.differences(group)
            for run, stats in self.summary(group).items():
                for metric, stat in stats.items():
                    if stat is None:
                        continue
                    diff = diffs.get(run, {}).get(metric)
                    rows.append({"group": group, "run": run, "metric": metric, "mean": stat.mean,
                                 "sem": stat.to_dict()["sem"], "n_subjects": stat.n,
                                 "baseline": self.baseline,
                                 "diff": diff.mean if diff else None,
                                 "diff_sem": diff.to_dict()["sem"] if diff else None})
        return rows

    # --- Markdown --------------------------------------------------------------------------------

    def markdown_table(self, group: str = "all") -> str:
        """Run | Subjects | metrics (mean ± s.e.) | Δ metrics vs the baseline."""
        summary, diffs, real = self.summary(group), self.differences(group), self.real_summary(group)
        head = ["Run", "Subjects", *(LABELS[m] for m in self.metrics)]
        if len(self.runs) > 1:
            head += [f"Δ {LABELS[m]}" for m in self.metrics]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        if any(real.values()):
            n = max(s.n for s in real.values() if s)
            cells = [real.get(m).format() if real.get(m) else "–" for m in self.metrics]
            lines.append(f"| {REAL_IMAGES} | {n} | " + " | ".join(cells + ["" for _ in head[2 + len(cells):]]) + " |")
        for run in self.runs:
            stats = summary[run]
            n = max((s.n for s in stats.values() if s), default=0)
            name = f"{run} (baseline)" if run == self.baseline and len(self.runs) > 1 else run
            cells = [stats[m].format() if stats[m] else "–" for m in self.metrics]
            if len(self.runs) > 1:
                cells += [diffs[run][m].format(signed=True) if run in diffs and diffs[run][m] else "–"
                          for m in self.metrics]
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def markdown(self, title: str = "Subject fidelity", pictures: dict[str, str] | None = None) -> str:
        """The full report: one table per subject group, the settings, and the pictures."""
        parts = [f"# {title}", "", self._legend(), ""]
        for group in self.groups():
            n = len({s.subject for s in self.scores if _in_group(s.live, group)})
            parts += [f"## {GROUPS[group]} ({n})", "", self.markdown_table(group), ""]
        for name, path in (pictures or {}).items():
            parts += [f"![{name}]({path})", ""]
        return "\n".join(parts)

    def _legend(self) -> str:
        models = self.settings.get("models", {})
        dino = models.get("dino", {}).get("model", "?")
        clip = models.get("clip", {}).get("model", "?")
        prompt = models.get("clip_t_prompt", "")
        text = (f"Mean ± standard error over subjects (each subject averaged first). Raw cosine similarities. "
                f"DINO: `{dino}` CLS token; CLIP-I / CLIP-T: `{clip}`; CLIP-T prompts: {prompt}.")
        if len(self.runs) > 1:
            text += f" Δ: difference to `{self.baseline}`, ± paired standard error over shared subjects."
        return text

    # --- files -----------------------------------------------------------------------------------

    def write(self, out_dir: str | Path, *, pictures: bool = True, grid_prompts: int | None = None) -> dict[str, Path]:
        """Write JSON, CSVs, Markdown and (optionally) the pictures into `out_dir`; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {
            "json": write_text(out / "results.json", json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"),
            "per_subject_csv": write_text(out / "per_subject.csv", _csv(self.per_subject_rows())),
            "summary_csv": write_text(out / "summary.csv", _csv(self.summary_rows())),
        }
        links = {}
        if pictures:
            written["chart"] = save_image(self.bar_chart(), out / "metrics.png")
            links["Metrics per run"] = "metrics.png"
            for subject in dict.fromkeys(s.subject for s in self.scores):
                grid = self.image_grid(subject, max_prompts=grid_prompts)
                if grid is not None:
                    written[f"grid_{subject}"] = save_image(grid, out / f"grid_{subject}.png")
                    links[f"Samples: {subject}"] = f"grid_{subject}.png"
        written["markdown"] = write_text(out / "report.md", self.markdown(pictures=links))
        return written

    def bar_chart(self):
        """Grouped bars: one group per metric, one bar per run (plus the real images), ± s.e."""
        series = {}
        real = self.real_summary()
        if any(real.values()):
            series[REAL_IMAGES] = {m: real.get(m) for m in self.metrics}
        series.update(self.summary())
        return charts.bar_chart(series, [LABELS[m] for m in self.metrics], list(self.metrics),
                                title="Subject fidelity (mean ± s.e. over subjects)")

    def image_grid(self, subject: str, max_prompts: int | None = None):
        """Rows: prompts; columns: a real image of the subject, then each run's first image for the prompt."""
        runs = {s.run: s for s in self.scores if s.subject == subject}
        prompts = list(dict.fromkeys(i.prompt for s in runs.values() for i in s.images if i.prompt))
        if not prompts:
            return None
        prompts = prompts[:max_prompts] if max_prompts else prompts
        ref = next((r for r in self.references if r.subject == subject and r.files), None)
        rows = []
        for k, prompt in enumerate(prompts):
            cells = [ref.files[k % len(ref.files)] if ref else None]  # a different real image per row
            for run in self.runs:
                match = next((i.file for i in runs[run].images if i.prompt == prompt), None) if run in runs else None
                cells.append(match)
            rows.append((prompt, cells))
        return charts.image_grid(rows, ["Reference", *self.runs], title=subject)


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def merge(reports: list[FidelityReport], baseline: str | None = None) -> FidelityReport:
    """Combine reports of separate runs into one comparison; they must use the same metric models."""
    keys = {}
    for report in reports:
        models = report.settings.get("models", {})
        key = tuple(json.dumps(models.get(k), sort_keys=True) for k in ("dino", "clip", "clip_t_prompt"))
        keys.setdefault(key, []).append(", ".join(report.runs))
    if len(keys) > 1:
        raise EvalError(
            "The results were scored with different metric models, preprocessing or CLIP-T prompts and cannot "
            "be compared: " + " vs ".join(f"[{'; '.join(runs)}]" for runs in keys.values())
            + ". Rescore them with the same `--dino_model`/`--clip_model`/`--keep_identifier`."
        )
    scores, seen = [], set()
    for report in reports:
        for s in report.scores:
            if (s.run, s.subject) in seen:
                raise EvalError(f"Run `{s.run}` scores subject `{s.subject}` in more than one results file.")
            seen.add((s.run, s.subject))
            scores.append(s)
    references = list({r.subject: r for report in reports for r in report.references}.values())
    return FidelityReport(scores, references, reports[0].settings, baseline)
