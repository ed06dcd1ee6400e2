"""`python -m flatlora_diffusion.flatness --base MODEL --adapters NAME=DIR ... --data DIR --out DIR`.

Writes OUT/flatness.json, flatness.csv, flatness.png (expected loss against the noise radius) and
directions.png (the 1-D loss curves); see `flatlora_diffusion.flatness` and docs/flatness.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from flatlora_diffusion.adapters import adapter_name_for
from flatlora_diffusion.flatness import measure_flatness
from flatlora_diffusion.flatness.config import FlatnessConfig, FlatnessError

_DEFAULT = " (default: %(default)s)"


def _help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in fields(FlatnessConfig)}


def parse_adapters(items: list[str]) -> dict[str, str]:
    """NAME=DIR (or DIR, named after its folder) -> {name: folder}; a repeated name is an error."""
    adapters, errors = {}, []
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep:
            name, folder = adapter_name_for(item.rstrip("/").split("/")[-1]), item
        if not name or not folder:
            errors.append(f"`--adapters` {item!r}: write NAME=DIR.")
        elif name in adapters:
            errors.append(f"`--adapters`: the name `{name}` is given twice; names must be unique.")
        else:
            adapters[name] = folder
    if errors:
        raise FlatnessError(errors)
    return adapters


def _radii(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace(" ", ",").split(",") if part)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"`--radii` takes comma-separated numbers, got {text!r}.") from err


def build_parser() -> argparse.ArgumentParser:
    helps, defaults = _help(), FlatnessConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(prog="python -m flatlora_diffusion.flatness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help=helps["base"])
    parser.add_argument("--adapters", required=True, nargs="+", metavar="NAME=DIR", help=helps["adapters"])
    parser.add_argument("--data", required=True, help=helps["data"])
    parser.add_argument("--out", required=True, help=helps["out"])
    parser.add_argument("--radii", type=_radii, default=",".join(f"{r:g}" for r in defaults["radii"].default_factory()),
                        help=helps["radii"] + " Comma-separated (default: %(default)s).")
    for name in ("draws", "directions", "alpha_points", "samples", "batch_size", "resolution", "max_length", "seed"):
        parser.add_argument(f"--{name}", type=int, default=defaults[name].default, help=helps[name] + _DEFAULT)
    parser.add_argument("--direction_scale", type=float, default=defaults["direction_scale"].default,
                        help=helps["direction_scale"] + _DEFAULT)
    for name in ("prompt", "template", "sampler", "device", "dtype"):
        parser.add_argument(f"--{name}", default=defaults[name].default, help=helps[name] + _DEFAULT)
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "no_progress"}  # argparse typed the default --radii too
    try:
        values["adapters"] = parse_adapters(values["adapters"])
        config = FlatnessConfig(**values)
        report = measure_flatness(config, progress=not args.no_progress)
    except FlatnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, result in report["adapters"].items():
        worst = max(result["expected"].values(), key=lambda e: e["radius"])
        print(f"{name}: L(0) = {result['loss']:.6g}; at r = {worst['radius']:g}: E L = {worst['mean']:.6g} "
              f"± {worst['sem']:.2g}, sharpness {worst['sharpness']:+.4g}")
    print(f"Wrote {config.out}/flatness.json, flatness.csv, flatness.png, directions.png "
          f"({report['seconds']:.1f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
