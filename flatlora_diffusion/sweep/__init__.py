"""A ρ sweep in one command: DreamBooth runs over (ρ, seed, subject), DreamBench scores, flatness, one report.

    python -m flatlora_diffusion.sweep --config configs/demo.yaml --rho 0 0.05 0.1 --seeds 0 1 2 \
        --subjects DATASET/images/SUBJECT ... --out DIR [-- EXTRA TRAINER FLAGS]

`plan` holds the settings and the grid, `runner` the steps (train, score, measure), `stats` the two
statistics, `report` the Markdown/JSON/PNG report.
"""

from flatlora_diffusion.sweep.plan import SweepConfig, SweepError

__all__ = ["SweepConfig", "SweepError", "run_sweep"]


def run_sweep(config: SweepConfig) -> dict:
    """Train, score, measure and report (see `flatlora_diffusion.sweep.runner.run_sweep`)."""
    from flatlora_diffusion.sweep.runner import run_sweep as _run

    return _run(config)
