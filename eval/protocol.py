"""`python -m eval dreambench`: the DreamBench protocol end to end for several runs, side by side.

    report = run_dreambench(DreamBenchConfig(base=..., adapters=["lora=runs/lora", "flat=runs/flat"],
                                             dataset="data/dreambench", out="outputs/dreambench"))

1. check the dataset, the subjects and every (run, subject) adapter — before any model loads;
2. generate the missing images (`eval.generation`, through `flatlora_diffusion.sampling`);
3. score every (run, subject) against the subject's real images, plus the real-images row;
4. write the JSON, CSVs, Markdown table, bar chart and sample grids (`eval.report`).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from eval.config import DreamBenchConfig
from eval.dreambench import DreamBench
from eval.errors import EvalError
from eval.fidelity import FidelityScorer
from eval.generation import PRES_SEED_OFFSET, Run, generate_missing, missing_images, plan, resolve_runs
from eval.report import FidelityReport
from flatlora_diffusion.adapters import AdapterError, read_adapter_info


def _adapter_facts(runs: list[Run]) -> dict:
    """What each adapter is (rank, ρ, base, instance prompt), recorded with the results."""
    facts, errors = {}, []
    for run in runs:
        facts[run.name] = {}
        for subject, path in run.adapters.items():
            if path is None:
                facts[run.name][subject] = {"path": None, "base_model_only": True}
                continue
            try:
                info = read_adapter_info(path)
            except AdapterError as err:
                errors.append(f"run `{run.name}`, subject `{subject}`: {err}")
                continue
            facts[run.name][subject] = {"path": str(path.resolve()), "base_model": info.base_model,
                                        "model_type": info.model_type, "rank": info.rank, "alpha": info.alpha,
                                        "rho": info.rho, "schedule": info.schedule,
                                        "instance_prompt": (info.training or {}).get("instance_prompt")}
    if errors:
        raise EvalError("Unreadable adapters (`--adapters`):\n  - " + "\n  - ".join(errors))
    return facts


def run_dreambench(config: DreamBenchConfig) -> FidelityReport:
    """Generate what is missing, score everything, write the reports into `config.out`; returns the report."""
    bench = DreamBench(config.dataset)
    subjects = bench.select(config.subjects)
    runs = resolve_runs(config.adapters, [s.name for s in subjects])
    adapters = _adapter_facts(runs)
    tasks = plan(runs, subjects, config)
    todo = missing_images(tasks)
    on_disk = sum(len(t.paths) for t in tasks) - sum(len(v) for v in todo.values())
    print(f"{len(runs)} run(s) x {len(subjects)} subject(s): {on_disk} image(s) on disk, "
          f"{sum(len(v) for v in todo.values())} to generate.")
    if todo:
        generate_missing(tasks, todo, config)

    scorer = FidelityScorer(config)
    references = [scorer.reference_score(s.name, s.images, s.live) for s in subjects]
    scores = []
    for run in tqdm(runs, desc="scoring runs", unit="run", disable=None):
        for subject in subjects:
            mine = [t for t in tasks if t.run == run.name and t.subject == subject.name]
            prompted = [t for t in mine if t.prompt_index is not None]
            files = [p for t in prompted for p in t.paths]
            prompts = [t.prompt for t in prompted for _ in t.paths]
            score = scorer.score(run.name, subject.name, files, subject.images, prompts,
                                 class_noun=subject.class_noun, live=subject.live, div=config.div)
            class_task = next((t for t in mine if t.prompt_index is None), None)
            if class_task is not None:
                score.pres = scorer.pres(class_task.paths, subject.images, subject.name)
            scores.append(score)

    settings = {
        "config": config.to_dict(),
        "models": scorer.describe(),
        "protocol": {
            "dataset": str(bench.root.resolve()),
            "subjects": [s.name for s in subjects],
            "prompts_per_subject": len(subjects[0].prompts()[: config.max_prompts]),
            "images_per_prompt": config.images_per_prompt,
            "seeds": f"image i of prompt p: {config.seed} + p * {config.images_per_prompt} + i (same in every run)",
            "pres_seeds": f"{config.seed + PRES_SEED_OFFSET} + i" if config.pres else None,
            "div": "1 - mean pairwise DINO among images of the same prompt" if config.div else None,
        },
        "generation": {"base": config.base, "dtype": str(config.generation_dtype()).removeprefix("torch."),
                       "steps": config.steps, "guidance_scale": config.guidance_scale,
                       "scheduler": config.scheduler or "pipeline default", "negative_prompt": config.negative_prompt,
                       "size": [config.width, config.height]},
        "adapters": adapters,
    }
    report = FidelityReport(scores, references, settings, config.baseline)
    report.write(config.out, grid_prompts=config.grid_prompts)
    return report


def main(config: DreamBenchConfig) -> int:
    """CLI: run the protocol, list the files and print the table."""
    report = run_dreambench(config)
    print(f"Reports in {config.out}: results.json, per_subject.csv, summary.csv, report.md, metrics.png, grid_*.png")
    print(report.markdown_table())
    return 0
