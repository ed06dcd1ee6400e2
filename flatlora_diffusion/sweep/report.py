"""The sweep's report: per-ρ mean ± s.e. over (subject, seed) runs, paired differences to ρ = 0,
a bar chart, an image grid (same prompt and image seed across ρ) and the flatness figures.

Writes ``report.json`` (every run's numbers and every summary), ``report.md``, ``metrics.png``,
``grid.png`` and ``sharpness.png``; the flatness meter's own charts (expected loss per radius and
the 1-D direction curves of every adapter) stay in ``flatness/<subject>/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flatlora_diffusion.files import save_image, write_text
from flatlora_diffusion.stats import Estimate, mean_sem, paired_difference

# (key in a run's row, label); rows without a key leave its column out.
METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("div", "DIV"), ("pres", "PRES"),
           ("oracle_subject", "oracle: subject"), ("oracle_scene", "oracle: scene"),
           ("oracle_scene_and_subject", "oracle: scene and subject"), ("flat_loss", "loss L(0)"))
HIGHER_IS_BETTER = {"pres": False, "train_seconds": False, "flat_loss": False}
CHART_METRICS = ("dino", "clip_i", "clip_t", "div", "oracle_subject", "oracle_scene")


def metric_keys(rows: list[dict]) -> list[tuple[str, str]]:
    """The metrics present in `rows`: the fixed ones, then sharpness at each radius, then time."""
    present = {k for row in rows for k, v in row.items() if v is not None}
    keys = [(k, label) for k, label in METRICS if k in present]
    keys += [(k, f"sharpness r={k.split('@')[1]}") for k in sorted(present, key=_radius) if k.startswith("sharpness@")]
    return keys + ([("train_seconds", "train time (s)")] if "train_seconds" in present else [])


def _radius(key: str) -> float:
    return float(key.split("@")[1]) if "@" in key else -1.0


def summarise(rows: list[dict], rhos: list[float]) -> dict:
    """Per ρ: mean ± s.e. of each metric over its runs; per ρ ≠ 0: the paired difference to ρ = 0."""
    keys = [k for k, _ in metric_keys(rows)]
    by_rho = {rho: [r for r in rows if r["rho"] == rho] for rho in rhos}
    per_rho = {rho: {k: mean_sem([r.get(k) for r in runs]) for k in keys} for rho, runs in by_rho.items()}
    delta = {}
    if 0.0 in by_rho:
        base = {k: {(r["subject"], r["seed"]): r.get(k) for r in by_rho[0.0]} for k in keys}
        for rho, runs in by_rho.items():
            if rho != 0.0:
                delta[rho] = {k: paired_difference({(r["subject"], r["seed"]): r.get(k) for r in runs}, base[k])
                              for k in keys}
    return {"per_rho": per_rho, "delta": delta, "keys": keys}


def _verdict(delta: Estimate, key: str) -> str:
    """How a paired difference reads: outside ±2 s.e. is a measurable change, else no measurable difference."""
    if delta.n < 2 or math.isnan(delta.sem):
        return "n too small"
    if abs(delta.mean) <= 2 * delta.sem:
        return "no measurable difference"
    better = (delta.mean > 0) == HIGHER_IS_BETTER.get(key, True)
    return "better" if better else "worse"


def markdown(summary: dict, rows: list[dict], base_rows: list[dict], settings: dict) -> str:
    """The Markdown report."""
    labels = dict(metric_keys(rows + base_rows))
    keys = summary["keys"]
    n_subjects = len({r["subject"] for r in rows})
    n_seeds = len({r["seed"] for r in rows})
    lines = ["# ρ sweep", "",
             f"{len(rows)} runs: ρ ∈ {{{', '.join(f'{r:g}' for r in summary['per_rho'])}}} × {n_seeds} seeds × "
             f"{n_subjects} subjects. Base config `{settings['config']}`"
             + (f", extra trainer flags `{' '.join(settings['train_args'])}`" if settings["train_args"] else "") + ".",
             "Each cell: mean ± standard error over the (subject, seed) runs of that ρ (n in the last column). "
             "Train time: wall seconds of each training process, with whatever else the machine was running.", "",
             "| run | " + " | ".join(labels[k] for k in keys) + " | n |",
             "|---|" + "---|" * (len(keys) + 1)]
    if base_rows:
        base = {k: mean_sem([r.get(k) for r in base_rows]) for k in keys}
        lines.append("| base model (no adapter) | " + " | ".join(base[k].text() for k in keys)
                     + f" | {len(base_rows)} subjects |")
    for rho, stats in summary["per_rho"].items():
        name = "LoRA (ρ = 0)" if rho == 0 else f"Flat-LoRA ρ = {rho:g}"
        n = max((s.n for s in stats.values()), default=0)
        lines.append(f"| {name} | " + " | ".join(stats[k].text() for k in keys) + f" | {n} |")
    if summary["delta"]:
        lines += ["", "Paired difference to ρ = 0 (same subject, same training seed, same evaluation images): "
                  "mean ± paired standard error; a difference beyond ±2 s.e. is called measurable.", "",
                  "| ρ | " + " | ".join(labels[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for rho, stats in summary["delta"].items():
            lines.append(f"| {rho:g} − 0 | " + " | ".join(f"{stats[k].text()} ({_verdict(stats[k], k)})" for k in keys)
                         + " |")
    lines += ["", "![metrics](metrics.png)", ""]
    if any(k.startswith("sharpness@") for k in keys):
        lines += ["Sharpness E L(r) − L(0) under the Flat-LoRA noise at radius r (flatness meter, "
                  "`flatness/<subject>/`; lower = flatter):", "", "![sharpness](sharpness.png)", ""]
    lines += ["![grid](grid.png)", ""]
    return "\n".join(lines)


def chart(summary: dict, base_rows: list[dict]):
    """Grouped bars of the headline metrics per ρ (and the base model), error bars = s.e."""
    from eval.charts import bar_chart

    keys = [k for k in CHART_METRICS if k in summary["keys"]]
    labels = dict(METRICS)
    series = {}
    if base_rows:
        series["base model"] = {k: mean_sem([r.get(k) for r in base_rows]) for k in keys}
    for rho, stats in summary["per_rho"].items():
        series["LoRA (rho = 0)" if rho == 0 else f"Flat-LoRA rho = {rho:g}"] = {k: stats[k] for k in keys}
    # Pillow's bundled font has no Greek letters: the charts spell rho out.
    return bar_chart(series, [labels[k] for k in keys], keys, title="rho sweep: mean +/- s.e. over subjects x seeds")


def sharpness_chart(summary: dict):
    """Mean sharpness vs radius per ρ (error bars = s.e. over runs), or None without flatness figures."""
    from eval.charts import line_chart

    radii = [k for k in summary["keys"] if k.startswith("sharpness@")]
    if not radii:
        return None
    series = {("LoRA (rho = 0)" if rho == 0 else f"Flat-LoRA rho = {rho:g}"):
              [(0.0, 0.0, 0.0)] + [(_radius(k), stats[k].mean, stats[k].sem) for k in radii]
              for rho, stats in summary["per_rho"].items()}
    return line_chart(series, title="Sharpness under Flat-LoRA noise (mean +/- s.e. over subjects x seeds)",
                      x_label="radius r", y_label="E L(r) - L(0)")


def write_report(out: Path, rows: list[dict], base_rows: list[dict], rhos: list[float], settings: dict,
                 grid_rows: list[tuple[str, list]] | None = None, grid_columns: list[str] | None = None) -> dict:
    """Write `report.json`, `report.md`, `metrics.png` (and `grid.png` when `grid_rows` are given); return the summary."""
    summary = summarise(rows, rhos)
    as_dict = {"settings": settings, "runs": rows, "base": base_rows,
               "per_rho": {f"{rho:g}": {k: e.to_dict() for k, e in s.items()} for rho, s in summary["per_rho"].items()},
               "delta_vs_rho0": {f"{rho:g}": {k: e.to_dict() for k, e in s.items()} for rho, s in summary["delta"].items()}}
    write_text(out / "report.json", json.dumps(as_dict, indent=1) + "\n")
    write_text(out / "report.md", markdown(summary, rows, base_rows, settings))
    save_image(chart(summary, base_rows), out / "metrics.png")
    sharpness = sharpness_chart(summary)
    if sharpness is not None:
        save_image(sharpness, out / "sharpness.png")
    if grid_rows:
        from eval.charts import image_grid

        save_image(image_grid(grid_rows, grid_columns, cell=96, title="same prompt and image seed across rho (the first training seed)"),
                   out / "grid.png")
    return summary
