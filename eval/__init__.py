"""Evaluation of Flat-LoRA runs: DreamBench subject fidelity (DINO, CLIP-I, CLIP-T) and LLM evals.

Library entry points (the command line is ``python -m eval``, see `eval.cli`):

* `eval.fidelity.FidelityScorer`: score generated images of a subject against its real images.
* `eval.report.FidelityReport`: mean ± s.e. over subjects, differences to a baseline, JSON/CSV/Markdown/pictures.
* `eval.dreambench.DreamBench`: the dataset's subjects, classes and 25 prompts per subject.
* `eval.metrics`: the metric math on embeddings.
* `eval.gsm8k`, `eval.humaneval`: LLM evals (HumanEval programs run in `eval.sandbox`).
"""

from eval.config import FidelityConfig, GSM8KConfig, HumanEvalConfig, ScoringConfig
from eval.errors import EvalError

__all__ = ["EvalError", "FidelityConfig", "GSM8KConfig", "HumanEvalConfig", "ScoringConfig"]
