"""`python -m flatlora_diffusion.llm COMMAND`: LLM fine-tuning with LoRA / Flat-LoRA.

    python -m flatlora_diffusion.llm train --config configs/llm_metamath.yaml [--section.key value ...]
    python -m flatlora_diffusion.llm train --help          # every key, its default and help
    python -m flatlora_diffusion.llm demo --out runs/llm_demo [--max_steps N]
    python -m flatlora_diffusion.llm merge --model BASE --adapter RUN/adapter --out RUN/merged [--dtype bfloat16]
    python -m flatlora_diffusion.llm synthetic --out data/arith [--train 2000] [--test 200] [--seed 0]

Multi-GPU: `accelerate launch --num_processes N -m flatlora_diffusion.llm train ...` or
`torchrun --nproc_per_node N -m flatlora_diffusion.llm train ...`.
Bad input ends with `error: ...` (naming the flag or file and the fix) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    demo.add_argument("--max_steps", type=int, help="optimiser steps per run (default: the demo config's 120)")
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
    return parser


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
