"""Command line of the toy world.

    python -m flatlora_diffusion.toyworld pretrain OUT_DIR [--minutes 90] [--device cpu|cuda] [--seed 0]
                                                   [--resume | --overwrite] [--threads 1] [--stages ...]
    python -m flatlora_diffusion.toyworld ship OUT_DIR           # copy a pretrained world into the package
    python -m flatlora_diffusion.toyworld subjects OUT_DIR       # the subjects in DreamBench's layout
    python -m flatlora_diffusion.toyworld quality OUT_DIR [--base toy:sd] [--captions 240] [--snapshots DIR]
    python -m flatlora_diffusion.toyworld subject OUT_DIR --subject NAME [--adapter DIR] [--base toy:sd]
    python -m flatlora_diffusion.toyworld dreambooth OUT_DIR [--subjects ...] [--variants ...] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pretrain(args, parser) -> int:
    import torch

    from flatlora_diffusion.toyworld.pretrain import STAGES, PretrainError, PretrainSettings, pretrain

    if args.minutes <= 0:
        parser.error(f"`--minutes` must be positive, got {args.minutes}.")
    if args.unet_extra_steps < 0:
        parser.error(f"`--unet_extra_steps` must be 0 or more, got {args.unet_extra_steps}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("`--device cuda`: no CUDA device is available; use `--device cpu`.")
    unknown = sorted(set(args.stages or ()) - set(STAGES))
    if unknown:
        parser.error(f"`--stages`: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}.")
    torch.set_num_threads(args.threads)
    try:
        settings = PretrainSettings(minutes=args.minutes, seed=args.seed, unet_extra_steps=args.unet_extra_steps)
        pretrain(args.out_dir, settings, device=args.device, resume=args.resume, overwrite=args.overwrite,
                 stages=tuple(args.stages) if args.stages else None, threads=args.threads)
    except PretrainError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


def _ship(args, parser) -> int:
    from flatlora_diffusion.toyworld.registry import SHIPPED_DIR, ToyModelError, ship

    try:
        ship(args.out_dir)
    except ToyModelError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"Copied the toy models from {args.out_dir} to {SHIPPED_DIR}")
    return 0


def _quality(args, parser) -> int:
    import torch

    from flatlora_diffusion.files import save_image, write_text
    from flatlora_diffusion.sampling import load_pipeline
    from flatlora_diffusion.toyworld.oracle import load_oracle
    from flatlora_diffusion.toyworld.quality import caption_following, grid

    torch.set_num_threads(args.threads)
    pipe, oracle = load_pipeline(args.base), load_oracle(args.oracle)
    runs = [("final", None)]
    if args.snapshots:
        runs = [(path.stem, path) for path in sorted(Path(args.snapshots).glob("ema-*.safetensors"))] + runs
    own = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    results = {}
    for name, path in runs:
        if path is not None:
            from safetensors.torch import load_file

            pipe.unet.load_state_dict({**own, **load_file(path)})
        else:
            pipe.unet.load_state_dict(own)
        result, images, captions = caption_following(pipe, oracle, args.captions)
        results[name] = result
        line = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result["attributes"].items())
        print(f"{name}: {line}", flush=True)
        if path is None:
            save_image(grid(images[:32], 8, captions[:32]), args.out_dir / "samples.png")
    write_text(args.out_dir / "quality.json", json.dumps({"base": args.base, "results": results}, indent=2) + "\n")
    print(f"Wrote {args.out_dir / 'quality.json'} and {args.out_dir / 'samples.png'}")
    return 0


def _subject(args, parser) -> int:
    import torch

    from flatlora_diffusion.adapters import load_adapter
    from flatlora_diffusion.files import save_image, write_text
    from flatlora_diffusion.sampling import load_pipeline
    from flatlora_diffusion.toyworld.oracle import load_oracle
    from flatlora_diffusion.toyworld.quality import grid, subject_fidelity
    from flatlora_diffusion.toyworld.subjects import SUBJECTS_BY_NAME

    if args.subject not in SUBJECTS_BY_NAME:
        parser.error(f"`--subject` {args.subject!r} is not a toy subject; choose from {', '.join(SUBJECTS_BY_NAME)}.")
    torch.set_num_threads(args.threads)
    pipe, oracle = load_pipeline(args.base), load_oracle(args.oracle)
    adapters = None
    if args.adapter:
        load_adapter(pipe, args.adapter, "subject")
        adapters = {"subject": 1.0}
    result, images, prompts = subject_fidelity(pipe, oracle, SUBJECTS_BY_NAME[args.subject], adapters=adapters,
                                               images_per_prompt=args.images_per_prompt)
    result |= {"base": args.base, "adapter": str(args.adapter) if args.adapter else None}
    write_text(args.out_dir / "subject.json", json.dumps(result, indent=2) + "\n")
    first = [i for i, prompt in enumerate(prompts) if i == 0 or prompt != prompts[i - 1]]  # one image per prompt
    save_image(grid([images[i] for i in first], 9, [prompts[i] for i in first]), args.out_dir / "samples.png")
    print(json.dumps({k: v for k, v in result.items() if k in ("instance_prompt", "scene_prompts")}, indent=1))
    return 0


def _dreambooth(args, parser) -> int:
    from flatlora_diffusion.toyworld.experiment import run_experiment

    try:
        print(run_experiment(args.out_dir, args.subjects, args.variants, base=args.base, config=args.config,
                             jobs=args.jobs, images_per_prompt=args.images_per_prompt))
    except (ValueError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m flatlora_diffusion.toyworld COMMAND ...`."""
    parser = argparse.ArgumentParser(prog="python -m flatlora_diffusion.toyworld", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pre = commands.add_parser("pretrain", help="train the toy SD base, CLIP, ViT and oracle")
    pre.add_argument("out_dir", type=Path)
    pre.add_argument("--minutes", type=float, default=90.0,
                     help="budget on 2 CPU cores; fixes every stage's step count (default: %(default)s)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--unet_extra_steps", type=int, default=0,
                     help="train the UNet this many steps more, beyond --minutes (extends a finished run)")
    pre.add_argument("--device", default="cpu", help="cpu or cuda (faster; the step counts stay the same)")
    pre.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    pre.add_argument("--stages", nargs="+", default=None,
                     help="run only these stages (e.g. two processes: `oracle vit` and `vae clip unet`)")
    mode = pre.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR with its own settings")
    mode.add_argument("--overwrite", action="store_true", help="delete OUT_DIR's contents and start again")
    ship = commands.add_parser("ship", help="verify a pretrained world and copy it into the package (toy:*)")
    ship.add_argument("out_dir", type=Path)
    sub = commands.add_parser("subjects", help="write the DreamBooth subjects in DreamBench's layout")
    sub.add_argument("out_dir", type=Path)
    for name, text in (("quality", "caption following of a base model, read by the oracle"),
                       ("subject", "subject and scene fidelity of a base model or an adapter, read by the oracle")):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("out_dir", type=Path)
        cmd.add_argument("--base", default="toy:sd")
        cmd.add_argument("--oracle", default="toy:oracle")
        cmd.add_argument("--threads", type=int, default=1)
    commands.choices["quality"].add_argument("--captions", type=int, default=240)
    commands.choices["quality"].add_argument("--snapshots", type=Path,
                                             help="also score each EMA snapshot in this folder (the learning curve)")
    commands.choices["subject"].add_argument("--subject", required=True)
    commands.choices["subject"].add_argument("--adapter", type=Path, help="a trained adapter folder (none: the base)")
    commands.choices["subject"].add_argument("--images_per_prompt", type=int, default=4)
    from flatlora_diffusion.toyworld.experiment import DEMO_CONFIG, VARIANTS

    dream = commands.add_parser("dreambooth", help="train and score DreamBooth variants on the toy subjects")
    dream.add_argument("out_dir", type=Path)
    dream.add_argument("--subjects", nargs="+", help="default: all toy subjects")
    dream.add_argument("--variants", nargs="+", help=f"default: {' '.join(VARIANTS)}")
    dream.add_argument("--base", default="toy:sd")
    dream.add_argument("--config", type=Path, default=DEMO_CONFIG, help="trainer settings (default: the demo's)")
    dream.add_argument("--jobs", type=int, default=1, help="runs in parallel, one CPU thread each")
    dream.add_argument("--images_per_prompt", type=int, default=4, help="per scene/property prompt (instance: 4x)")
    args = parser.parse_args(argv)

    if args.command == "subjects":
        from flatlora_diffusion.toyworld.subjects import write_subjects

        print(f"Wrote the toy subjects to {write_subjects(args.out_dir)}")
        return 0
    handlers = {"pretrain": _pretrain, "ship": _ship, "quality": _quality, "subject": _subject,
                "dreambooth": _dreambooth}
    return handlers[args.command](args, parser)


if __name__ == "__main__":
    sys.exit(main())
