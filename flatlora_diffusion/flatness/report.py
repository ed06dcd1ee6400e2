"""The meter's outputs, each written atomically: flatness.json, flatness.csv, flatness.png, directions.png."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from flatlora_diffusion import files

CSV_FIELDS = ("adapter", "measure", "x", "direction", "loss", "sem", "sharpness", "n")


def csv_rows(report: dict) -> list[dict]:
    """Rows per adapter: each radius's expected loss, its paired sharpness difference to the reference
    adapter (`sharpness` holds the difference), and each (direction, α) of the curves."""
    rows = []
    for name, result in report["adapters"].items():
        for entry in result["expected"].values():
            rows.append({"adapter": name, "measure": "expected", "x": entry["radius"], "direction": "",
                         "loss": entry["mean"], "sem": entry["sem"], "sharpness": entry["sharpness"],
                         "n": len(entry["draws"])})
        for entry in (result["paired"]["sharpness"] or {}).values():
            rows.append({"adapter": name, "measure": f"paired_vs_{result['paired']['reference']}",
                         "x": entry["radius"], "direction": "", "loss": "", "sem": entry["sem"],
                         "sharpness": entry["delta_sharpness"], "n": report["settings"]["draws"]})
        curves = result["directions"]
        for index, losses in enumerate(curves["losses"]):
            for alpha, loss in zip(curves["alphas"], losses, strict=True):
                rows.append({"adapter": name, "measure": "direction", "x": alpha, "direction": index, "loss": loss,
                             "sem": "", "sharpness": loss - result["loss"], "n": 1})
    return rows


def expected_chart(report: dict):
    """E L(r) ± s.e. against r, one line per adapter."""
    from eval.charts import line_chart

    series = {name: [(e["radius"], e["mean"], e["sem"]) for e in result["expected"].values()]
              for name, result in report["adapters"].items()}
    draws = report["settings"]["draws"]
    return line_chart(series, title=f"Expected loss under Flat-LoRA noise (mean ± s.e., {draws} draws)",
                      x_label="noise radius r   (sigma_i = r * |W'_i| / sqrt(n))", y_label="E L(W' + eps)")


def directions_chart(report: dict):
    """L(W' + α·d) against α: the mean over directions (thick) and each direction (thin), per adapter."""
    from eval.charts import line_chart

    series, thin = {}, {}
    for name, result in report["adapters"].items():
        curves = result["directions"]
        series[name] = [(a, m, float("nan")) for a, m in zip(curves["alphas"], curves["mean"], strict=True)]
        thin[name] = [list(zip(curves["alphas"], losses, strict=True)) for losses in curves["losses"]]
    count = report["settings"]["directions"]
    return line_chart(series, thin=thin, title=f"Loss along {count} filter-normalised random directions",
                      x_label="step alpha   (row i of alpha*d has norm |alpha| * |W'_i|)", y_label="L(W' + alpha*d)")


def write_outputs(report: dict, out: str | Path) -> dict[str, Path]:
    """Write the four files into ``out``; returns their paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": files.write_text(out / "flatness.json", json.dumps(report, indent=2) + "\n")}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    paths["csv"] = files.write_text(out / "flatness.csv", buffer.getvalue())
    paths["flatness_png"] = files.save_image(expected_chart(report), out / "flatness.png")
    if report["settings"]["directions"]:
        paths["directions_png"] = files.save_image(directions_chart(report), out / "directions.png")
    return paths
