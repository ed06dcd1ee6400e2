"""Subject fidelity of generated images: DINO, CLIP-I (all pairs) and CLIP-T (matched pairs).

    scorer = FidelityScorer(ScoringConfig(dino_model=..., clip_model=...))
    score = scorer.score("flat-lora", "dog", generated_files, reference_files, prompts)
    score.dino, score.clip_i, score.clip_t

Per subject: DINO and CLIP-I are the mean cosine over all (generated, real) pairs, CLIP-T the mean
cosine of each image with its own prompt (identifier removed unless `keep_identifier`). Averages
over subjects happen in `eval.report`, never over the pooled images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eval import metrics
from eval.config import ScoringConfig
from eval.dreambench import LIVE_CLASSES, remove_identifier
from eval.embedders import Embedded, ImageEncoder
from eval.errors import EvalError
from eval.images import Skipped


@dataclass
class ImageScore:
    """One generated image: its prompt and its mean similarity to the subject's real images."""

    file: str
    prompt: str | None
    dino: float
    clip_i: float
    clip_t: float | None


@dataclass
class SubjectScore:
    """The metrics of one run on one subject, with the counts behind them."""

    run: str
    subject: str
    dino: float
    clip_i: float
    clip_t: float | None
    n_generated: int
    n_reference: int
    class_noun: str | None = None
    live: bool | None = None
    pres: float | None = None
    div: float | None = None
    skipped: list[dict] = field(default_factory=list)
    images: list[ImageScore] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> SubjectScore:
        row = dict(row)
        row["images"] = [ImageScore(**image) for image in row.get("images", [])]
        return cls(**row)


@dataclass
class ReferenceScore:
    """The "real images" row of one subject: the same metrics among its own real images (i ≠ j)."""

    subject: str
    dino: float | None
    clip_i: float | None
    n_reference: int
    live: bool | None = None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class FidelityScorer:
    """Scores generated images against a subject's real images; models load once, references embed once."""

    def __init__(self, config: ScoringConfig, encoder: ImageEncoder | None = None) -> None:
        self.config = config
        self.encoder = encoder or ImageEncoder.from_config(config)
        self._references: dict[tuple[str, ...], Embedded] = {}

    def describe(self) -> dict:
        """Models, preprocessing and prompt handling, for reports."""
        return {
            "dino": self.encoder["dino"].describe(),
            "clip": self.encoder["clip"].describe(),
            "dino_feature": "CLS token of last_hidden_state (after the final LayerNorm)",
            "clip_feature": "projected image/text embeddings",
            "similarity": "raw cosine; DINO and CLIP-I: mean over all (generated, real) pairs; "
                          "CLIP-T: mean over matched (image, own prompt) pairs",
            "clip_t_prompt": "with identifier" if self.config.keep_identifier
                             else f"identifier `{self.config.identifier}` removed",
        }

    def embed_reference(self, files: list[Path], subject: str = "reference") -> Embedded:
        """Embeddings of a subject's real images (memoised per file list)."""
        key = tuple(str(p.resolve()) for p in files)
        if key not in self._references:
            embedded = self.encoder.encode(files, desc=f"{subject}: real images")
            if not embedded.paths:
                raise EvalError(f"None of the {len(files)} reference images of `{subject}` could be read.")
            self._references[key] = embedded
        return self._references[key]

    def reference_score(self, subject: str, files: list[Path], live: bool | None = None) -> ReferenceScore:
        """The real-images row: within-set similarity of the subject's own images (needs ≥ 2)."""
        ref = self.embed_reference(files, subject)
        kept = [str(p) for p in ref.paths]
        if len(ref.paths) < 2:
            return ReferenceScore(subject, None, None, len(ref.paths), live, kept)
        dino = metrics.within_set_similarity(ref.vectors["dino"])
        clip_i = metrics.within_set_similarity(ref.vectors["clip"])
        return ReferenceScore(subject, dino, clip_i, len(ref.paths), live, kept)

    def clip_t_texts(self, prompts: list[str]) -> list[str]:
        """The texts CLIP-T compares against: the prompts, identifier removed unless kept."""
        if self.config.keep_identifier:
            return prompts
        return [remove_identifier(p, self.config.identifier) for p in prompts]

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings, each distinct text embedded once: (N, D)."""
        unique = list(dict.fromkeys(texts))
        table = self.encoder["clip"].embed_texts(unique)
        index = {text: i for i, text in enumerate(unique)}
        return table[[index[t] for t in texts]]

    def score(
        self,
        run: str,
        subject: str,
        generated: list[Path],
        reference: list[Path],
        prompts: list[str] | None = None,
        *,
        class_noun: str | None = None,
        live: bool | None = None,
        skipped: list[Skipped] | None = None,
        div: bool = False,
    ) -> SubjectScore:
        """Score one run on one subject. `prompts[i]` is the prompt of `generated[i]` (or None: no CLIP-T).

        `div` adds DIV: 1 − mean pairwise DINO among the images of each prompt, averaged over prompts.
        """
        if prompts is not None and len(prompts) != len(generated):
            raise EvalError(f"{len(prompts)} prompts for {len(generated)} generated images of `{subject}`.")
        ref = self.embed_reference(reference, subject)
        gen = self.encoder.encode(generated, desc=f"{run}/{subject}")
        skipped = [*(skipped or []), *gen.skipped]
        if not gen.paths:
            raise EvalError(f"No readable generated images for run `{run}`, subject `{subject}`.")
        dino = metrics.cosine_matrix(gen.vectors["dino"], ref.vectors["dino"]).mean(1)  # (N,) per image
        clip_i = metrics.cosine_matrix(gen.vectors["clip"], ref.vectors["clip"]).mean(1)  # (N,)
        kept_prompts, clip_t = None, None
        if prompts is not None:
            by_path = dict(zip(generated, prompts, strict=True))
            kept_prompts = [by_path[p] for p in gen.paths]
            texts = self.embed_texts(self.clip_t_texts(kept_prompts))
            clip_t = metrics.matched_cosines(gen.vectors["clip"], texts)  # (N,) each image with its own prompt
        images = [
            ImageScore(
                file=str(path),
                prompt=kept_prompts[i] if kept_prompts else None,
                dino=dino[i].item(),
                clip_i=clip_i[i].item(),
                clip_t=clip_t[i].item() if clip_t is not None else None,
            )
            for i, path in enumerate(gen.paths)
        ]
        diversity = None
        if div:
            if kept_prompts is None:
                raise EvalError(f"DIV needs the prompt of each image (run `{run}`, subject `{subject}`).")
            groups: dict[str, list[int]] = {}
            for i, prompt in enumerate(kept_prompts):
                groups.setdefault(prompt, []).append(i)
            diversity = metrics.diversity([gen.vectors["dino"][rows] for rows in groups.values()])
        return SubjectScore(
            run=run,
            subject=subject,
            # Every image has the same number of reference pairs, so the mean of per-image means
            # is exactly the all-pairs mean.
            dino=metrics.all_pairs_similarity(gen.vectors["dino"], ref.vectors["dino"]),
            clip_i=metrics.all_pairs_similarity(gen.vectors["clip"], ref.vectors["clip"]),
            clip_t=(metrics.matched_pairs_similarity(gen.vectors["clip"], texts) if prompts is not None else None),
            n_generated=len(gen.paths),
            n_reference=len(ref.paths),
            class_noun=class_noun,
            live=live if live is not None else (class_noun in LIVE_CLASSES if class_noun else None),
            div=diversity,
            skipped=[s.to_dict() for s in skipped],
            images=images,
        )

    def pres(self, class_images: list[Path], reference: list[Path], subject: str = "reference") -> float:
        """PRES: all-pairs DINO between images of the bare class prompt and the subject's real images."""
        ref = self.embed_reference(reference, subject)
        gen = self.encoder.encode(class_images, desc=f"{subject}: class prompt")
        if not gen.paths:
            raise EvalError(f"No readable class-prompt images for PRES of `{subject}`.")
        return metrics.all_pairs_similarity(gen.vectors["dino"], ref.vectors["dino"])
