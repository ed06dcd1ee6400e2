"""`python -m eval <command>`: subject fidelity, DreamBench runs, reports, benchmarks and LLM evals.

    python -m eval fidelity --generated gen/dog --reference data/dreambench/images/dog --prompts p.txt --json dog.json
    python -m eval fidelity --manifest runs.csv --out reports/cmp --baseline lora
    python -m eval dreambench --base MODEL --adapters lora=runs/lora flat=runs/flat --dataset data/dreambench --out out
    python -m eval report reports/lora/results.json reports/flat/results.json --baseline lora --out reports/cmp
    python -m eval bench-scoring --tiny --dataset data/dreambench
    python -m eval gsm8k --model PATH [--adapter DIR] --data gsm8k_test.jsonl --out gsm8k.json
    python -m eval humaneval --model PATH [--adapter DIR] --data HumanEval.jsonl.gz --out humaneval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from eval.config import DreamBenchConfig, FidelityConfig, GSM8KConfig, HumanEvalConfig, ScoringConfig
from eval.errors import EvalError
from flatlora_diffusion.files import write_text


def _fidelity(args: argparse.Namespace) -> int:
    from eval.environment import environment
    from eval.fidelity import FidelityScorer
    from eval.folders import prepare_folders, prepare_manifest, read_manifest, score_jobs
    from eval.report import FidelityReport

    config = FidelityConfig.from_args(args)
    if config.manifest:
        jobs = prepare_manifest(read_manifest(config.manifest))  # every folder and prompt file checked first
    else:
        jobs = [prepare_folders(config.generated, config.reference, prompts_file=config.prompts,
                                prompt_from_filenames=config.prompt_from_filenames)]
    scorer = FidelityScorer(config)
    scores, references = score_jobs(scorer, jobs)
    settings = {"config": config.to_dict(), "models": scorer.describe()}
    if config.manifest:
        report = FidelityReport(scores, references, settings, config.baseline)
        for name, path in report.write(config.out).items():
            print(f"wrote {name}: {path}")
        print(report.markdown_table())
        return 0
    score, ref = scores[0], references[0]
    result = {
        "subject": score.subject,
        "run": score.run,
        "dino": score.dino,
        "clip_i": score.clip_i,
        "clip_t": score.clip_t,
        "n_generated": score.n_generated,
        "n_reference": score.n_reference,
        "n_skipped": len(score.skipped),
        "skipped": score.skipped,
        "real_images": {"dino": ref.dino, "clip_i": ref.clip_i},
        **settings,
        "environment": environment(),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "models", "environment")}, indent=2))
    if config.json:
        result["images"] = [vars(i) for i in score.images]
        write_text(config.json, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return 0


def _dreambench(args: argparse.Namespace) -> int:
    from eval.protocol import main

    return main(DreamBenchConfig.from_args(args))


def _report(args: argparse.Namespace) -> int:
    from eval.report import FidelityReport, merge

    reports = []
    for path in args.results:
        path = Path(path)
        if not path.is_file():
            raise EvalError(f"Results file `{path}` does not exist.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise EvalError(f"Results file `{path}` is not valid JSON ({err}); was it written by `python -m eval`?") from err
        reports.append(FidelityReport.from_json(data))
    report = merge(reports, args.baseline) if len(reports) > 1 else FidelityReport(
        reports[0].scores, reports[0].references, reports[0].settings, args.baseline or reports[0].baseline)
    if args.out:
        for name, path in report.write(args.out, pictures=not args.no_pictures).items():
            print(f"wrote {name}: {path}")
    print(report.markdown_table())
    return 0


def _bench(args: argparse.Namespace) -> int:
    from eval.bench import main

    return main(ScoringConfig.from_args(args), args.images, args.dataset, args.tiny)


def _gsm8k(args: argparse.Namespace) -> int:
    from eval.gsm8k import main

    return main(GSM8KConfig.from_args(args))


def _humaneval(args: argparse.Namespace) -> int:
    from eval.humaneval import main

    return main(HumanEvalConfig.from_args(args))


def build_parser() -> argparse.ArgumentParser:
    """The `python -m eval` parser with one subcommand per evaluation."""
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fidelity = commands.add_parser("fidelity", help="DINO / CLIP-I / CLIP-T of image folders (one subject, or a manifest)")
    FidelityConfig.add_arguments(fidelity)
    fidelity.set_defaults(handler=_fidelity)

    dreambench = commands.add_parser("dreambench", help="generate the DreamBench images of trained adapters, score "
                                     "and compare the runs")
    DreamBenchConfig.add_arguments(dreambench)
    dreambench.set_defaults(handler=_dreambench)

    report = commands.add_parser("report", help="re-render or combine results.json files into one comparison")
    report.add_argument("results", nargs="+", help="results.json files written by `fidelity --manifest` or `dreambench`")
    report.add_argument("--baseline", help="run the differences are taken against")
    report.add_argument("--out", help="folder for the combined JSON, CSV, Markdown and pictures")
    report.add_argument("--no_pictures", "--no-pictures", action="store_true", help="skip the chart and grids")
    report.set_defaults(handler=_report)

    bench = commands.add_parser("bench-scoring", help="images/s of fidelity scoring")
    ScoringConfig.add_arguments(bench)
    bench.add_argument("--images", type=int, default=64, help="images to score (default: 64)")
    bench.add_argument("--dataset", help="score these images (e.g. the DreamBench folder) instead of noise")
    bench.add_argument("--tiny", action="store_true", help="use tiny random models (no download)")
    bench.set_defaults(handler=_bench)

    gsm8k = commands.add_parser("gsm8k", help="GSM8K accuracy, batched greedy decoding")
    GSM8KConfig.add_arguments(gsm8k)
    gsm8k.set_defaults(handler=_gsm8k)

    humaneval = commands.add_parser("humaneval", help="HumanEval pass@1, completions run in a sandboxed subprocess")
    HumanEvalConfig.add_arguments(humaneval)
    humaneval.set_defaults(handler=_humaneval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn bad input into a one-paragraph error and exit status 2."""
    args = build_parser().parse_args(argv)
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"  # no source lines
    try:
        return args.handler(args)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = format_warning
