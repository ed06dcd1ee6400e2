"""`python -m flatlora_diffusion.llm COMMAND`: LLM fine-tuning with LoRA / Flat-LoRA.

    python -m flatlora_diffusion.llm train --config configs/llm_metamath.yaml [--section.key value ...]
    python -m flatlora_diffusion.llm train --help          # every key, its default and help
    python -m flatlora_diffusion.llm demo --out runs/llm_demo [--max_steps N]
    python -m flatlora_diffusion.llm merge --model BASE --adapter RUN/adapter --out RUN/merged [--dtype bfloat16]
    python -m flatlora_diffusion.llm synthetic --out data/arith [--train 2000] [--test 200] [--seed 0]
    python -m flatlora_diffusion.llm pretrain OUT_DIR [--minutes 40] [--seed 0] [--device cpu|cuda]
    python -m flatlora_diffusion.llm ship OUT_DIR        # a pretrained OUT_DIR becomes `toy:llama`
    python -m flatlora_diffusion.llm compare --seeds 0 1 2 --out DIR [--max_steps N] [--test 200]

Multi-GPU: `accelerate launch --num_processes N -m flatlora_diffusion.llm train ...` or
`torchrun --nproc_per_node N -m flatlora_diffusion.llm train ...`.
Bad input ends with `error: ...` (naming the flag or file and the fix) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flatlora_diffusion.llm.config import LLMError


def _train(argv: list[str]) -> int:
    from flatlora_diffusion.llm.config import help_text, load_config
    from flatlora_diffusion.llm.train import run

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m flatlora_diffusion.llm train --config FILE.yaml [--section.key value ...]\n")
        print(help_text())
        return 0
    summary = run(load_config(argv), argv)
    print(json.dumps(summary, indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flatlora_diffusion.llm", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("train", help="fine-tune (all options: `train --help`)", add_help=False)

    demo = commands.add_parser("demo", help="offline LoRA vs Flat-LoRA on a tiny Llama, scored on GSM8K-style data")
    demo.add_argument("--out", required=True, help="folder for the model, data, runs and results.json")
    demo.add_argument("--max_steps", type=int, help="optimiser steps per run (default: the demo config's 200)")
    demo.add_argument("--train", type=int, default=2000, help="synthetic training problems (default: 2000)")
    demo.add_argument("--test", type=int, default=100, help="synthetic test problems scored (default: 100)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and of both runs (default: 0)")

    merge = commands.add_parser("merge", help="export base + adapter as one model folder (for serving)")
    merge.add_argument("--model", required=True, help="base model the adapter was trained on: hub id or folder")
    merge.add_argument("--adapter", required=True, help="a run's `adapter/` folder")
    merge.add_argument("--out", required=True, help="output folder (model + tokenizer)")
    merge.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                       help="precision of the merged weights (default: bfloat16)")

    synthetic = commands.add_parser("synthetic", help="write synthetic GSM8K-style train/test JSONL files")
    synthetic.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
    synthetic.add_argument("--train", type=int, default=2000, help="training problems (default: 2000)")
    synthetic.add_argument("--test", type=int, default=200, help="test problems (default: 200)")
    synthetic.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    synthetic.add_argument("--max_number", type=int, default=9, help="largest operand (default: 9)")

    pre = commands.add_parser("pretrain", help="pretrain the toy Llama (toy:llama) on the arithmetic language")
    pre.add_argument("out_dir", help="folder for llama/, MANIFEST.json and state/ (checkpoints)")
    pre.add_argument("--minutes", type=float, default=40.0,
                     help="budget on one CPU thread; fixes the step count (default: 40 = 3000 steps)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data (default: 0)")
    pre.add_argument("--device", default="cpu", help="cpu or cuda (the step count stays the same)")
    pre.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    pre.add_argument("--until", type=int, help="stop at this step of the schedule and export the weights there "
                                               "(the same command without it continues the run)")
    mode = pre.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR with its own settings")
    mode.add_argument("--overwrite", action="store_true", help="delete OUT_DIR's contents and start again")

    comp = commands.add_parser("compare", help="LoRA vs Flat-LoRA on toy:llama over seeds, in- and out-of-domain")
    comp.add_argument("--out", required=True, help="folder for data, runs and the report (resumable)")
    comp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    comp.add_argument("--max_steps", type=int, help="optimiser steps per run (default: the demo config's 200)")
    comp.add_argument("--train", type=int, default=2000, help="synthetic training problems (default: 2000)")
    comp.add_argument("--test", type=int, default=200, help="problems per test set (default: 200)")
    comp.add_argument("--model", default="toy:llama", help="base model (default: toy:llama)")

    ship = commands.add_parser("ship", help="verify a pretrained OUT_DIR and copy it into the package (toy:llama)")
    ship.add_argument("out_dir", help="a finished `pretrain` folder")
    return parser


def _pretrain(args) -> None:
    import torch

    from flatlora_diffusion.llm.pretrain import PretrainError, PretrainSettings, pretrain

    if not args.minutes > 0:
        raise PretrainError(f"`--minutes` must be positive, got {args.minutes}.")
    if args.threads < 1:
        raise PretrainError(f"`--threads` must be 1 or more, got {args.threads}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise PretrainError("`--device cuda`: no CUDA device is available; use `--device cpu`.")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise PretrainError(f"`--device` must be cpu or cuda, got {args.device!r}.")
    torch.set_num_threads(args.threads)
    settings = PretrainSettings(minutes=args.minutes, seed=args.seed)
    pretrain(args.out_dir, settings, device=args.device, resume=args.resume, overwrite=args.overwrite,
             threads=args.threads, until=args.until)


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input prints one `error:` paragraph and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "train":
            return _train(argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "demo":
            from flatlora_diffusion.llm.demo import run_demo

            results = run_demo(args.out, max_steps=args.max_steps, n_train=args.train, n_test=args.test,
                               seed=args.seed)
            print(json.dumps(results["runs"], indent=2))
            print(f"wrote {args.out}/results.json in {results['seconds']} s")
        elif args.command == "merge":
            from flatlora_diffusion.llm.train import merge_adapter

            print(f"wrote {merge_adapter(args.model, args.adapter, args.out, args.dtype)}")
        elif args.command == "compare":
            from flatlora_diffusion.llm.compare import compare

            results = compare(args.out, args.seeds, max_steps=args.max_steps, n_train=args.train, n_test=args.test,
                              model=args.model)
            print((Path(args.out) / "results.md").read_text())
            print(f"wrote {args.out}/results.json, results.md, comparison.png ({results['cpu_seconds']} CPU s)")
        elif args.command == "pretrain":
            _pretrain(args)
        elif args.command == "ship":
            from flatlora_diffusion.toyworld.registry import ship_llama

            print(f"wrote {ship_llama(args.out_dir)} (toy:llama)")
        elif args.command == "synthetic":
            from flatlora_diffusion.llm.synthetic import write_splits

            for path in write_splits(args.out, args.train, args.test, args.seed, args.max_number):
                print(f"wrote {path}")
        return 0
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
