"""`python -m flatlora_diffusion.sweep`: see `flatlora_diffusion.sweep`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from flatlora_diffusion.sweep import SweepConfig, SweepError, run_sweep


def _radii(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"`--radii` takes comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flatlora_diffusion.sweep",
        description="Train DreamBooth LoRA/Flat-LoRA runs over (ρ, seed, subject), score them on the DreamBench "
                    "protocol, measure their flatness and write one report. Trainer flags for every run go after `--`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="Trainer YAML every run starts from.")
    parser.add_argument("--rho", type=float, nargs="+", required=True, help="Flat-LoRA ρ values (0 = LoRA).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds.")
    parser.add_argument("--subjects", type=Path, nargs="+", required=True,
                        help="Instance image folders of one DreamBench-layout dataset (DATASET/images/SUBJECT).")
    parser.add_argument("--out", type=Path, required=True, help="Output folder (resumes what is there).")
    parser.add_argument("--jobs", type=int, default=1, help="Trainings at once.")
    parser.add_argument("--images_per_prompt", type=int, default=4, help="Evaluation images per prompt and run.")
    parser.add_argument("--max_prompts", type=int, default=None, help="Only the first K prompts (quick checks).")
    parser.add_argument("--eval_seed", type=int, default=0, help="Seed of the evaluation images and flatness data.")
    parser.add_argument("--dino_model", default="facebook/dino-vits16", help="DINO model (`toy:vit` on the toy world).")
    parser.add_argument("--clip_model", default="openai/clip-vit-base-patch32", help="CLIP model (`toy:clip`).")
    parser.add_argument("--device", default="auto", help="Device of evaluation and flatness.")
    parser.add_argument("--oracle", choices=("auto", "none"), default="auto",
                        help="Toy-world oracle metrics when every subject is a toy-world subject.")
    parser.add_argument("--no_flatness", action="store_true", help="Skip the flatness meter.")
    parser.add_argument("--radii", type=_radii, default=[0.0, 0.05, 0.1, 0.2], help="Flatness radii, comma-separated.")
    parser.add_argument("--draws", type=int, default=8, help="Flatness noise draws per radius.")
    parser.add_argument("--directions", type=int, default=2, help="Flatness random directions.")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = SweepConfig(config=args.config, rhos=args.rho, seeds=args.seeds, subjects=args.subjects,
                             out=args.out, train_args=argv[split + 1:], jobs=args.jobs,
                             images_per_prompt=args.images_per_prompt, max_prompts=args.max_prompts,
                             eval_seed=args.eval_seed, dino_model=args.dino_model, clip_model=args.clip_model,
                             device=args.device, oracle=args.oracle, flatness=not args.no_flatness,
                             radii=args.radii, draws=args.draws, directions=args.directions)
        run_sweep(config)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Report: {config.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
