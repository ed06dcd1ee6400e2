"""Metric math on hand-made embeddings, per-subject aggregation, and the preprocessing pipelines."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from eval import metrics
from eval.fidelity import ReferenceScore, SubjectScore
from eval.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    Preprocess,
    center_crop,
    clip_preprocess,
    dino_preprocess,
    resize_shorter,
)
from eval.report import FidelityReport, Stat

E = torch.eye(4)  # four orthonormal embeddings


def test_identical_embeddings_score_one() -> None:
    x = torch.randn(3, 8)
    assert metrics.all_pairs_similarity(x[:1], 5 * x[:1]) == pytest.approx(1.0)  # scale-invariant
    assert metrics.matched_pairs_similarity(x, 2 * x) == pytest.approx(1.0)


def test_orthogonal_embeddings_score_zero() -> None:
    assert metrics.all_pairs_similarity(E[:2], E[2:]) == pytest.approx(0.0)
    assert metrics.matched_pairs_similarity(E[:2], E[2:]) == pytest.approx(0.0)


def test_raw_cosines_are_not_rescaled_or_clipped() -> None:
    assert metrics.all_pairs_similarity(E[:1], -E[:1]) == pytest.approx(-1.0)
    half = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert metrics.all_pairs_similarity(half, E[:1]) == pytest.approx(1 / math.sqrt(2))


def test_all_pairs_differs_from_matched_pairs() -> None:
    images, texts = E[:2], E[:2].clone()
    assert metrics.matched_pairs_similarity(images, texts) == pytest.approx(1.0)  # each with its own
    assert metrics.all_pairs_similarity(images, texts) == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4


def test_all_pairs_is_the_mean_over_every_generated_reference_pair() -> None:
    gen, ref = torch.randn(5, 6), torch.randn(3, 6)
    expected = sum(
        torch.nn.functional.cosine_similarity(g, r, dim=0).item() for g in gen for r in ref
    ) / 15
    assert metrics.all_pairs_similarity(gen, ref) == pytest.approx(expected)


def test_within_set_excludes_self_pairs() -> None:
    x = torch.stack([E[0], E[0], E[1]])
    # Ordered pairs i != j: (0,1) and (1,0) are identical, the other four orthogonal.
    assert metrics.within_set_similarity(x) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="at least 2 images"):
        metrics.within_set_similarity(E[:1])


def test_diversity_is_one_minus_within_prompt_similarity() -> None:
    same, different = torch.stack([E[0], E[0]]), E[:2]
    assert metrics.diversity([same]) == pytest.approx(0.0)
    assert metrics.diversity([different]) == pytest.approx(1.0)
    assert metrics.diversity([same, different, E[:1]]) == pytest.approx(0.5)  # singletons ignored


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="as many texts as images"):
        metrics.matched_pairs_similarity(E[:2], E[:3])
    with pytest.raises(ValueError, match="widths differ"):
        metrics.all_pairs_similarity(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.all_pairs_similarity(torch.ones(0, 3), torch.ones(2, 3))


def test_mean_and_standard_error() -> None:
    mean, sem = metrics.mean_and_sem([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert sem == pytest.approx(math.sqrt(5 / 3) / 2)  # sample std / sqrt(n)
    assert math.isnan(metrics.mean_and_sem([0.7])[1])
    assert Stat(0.6684, 0.0123, 30).format() == "0.668 ± 0.012"
    assert Stat(0.01, math.nan, 1).format(signed=True) == "+0.010"


def _score(run: str, subject: str, dino: float, live: bool, n: int = 4) -> SubjectScore:
    return SubjectScore(run, subject, dino, dino, 0.3, n_generated=n, n_reference=4, live=live)


def test_runs_average_over_subjects_not_images() -> None:
    scores = [_score("a", "dog", 0.9, True, n=1000), _score("a", "can", 0.5, False, n=4)]
    report = FidelityReport(scores, [], {})
    stat = report.summary()["a"]["dino"]
    assert (stat.mean, stat.n) == (pytest.approx(0.7), 2)  # not the image-weighted 0.898
    assert report.summary("live")["a"]["dino"].mean == pytest.approx(0.9)
    assert report.summary("objects")["a"]["dino"].mean == pytest.approx(0.5)


def test_difference_to_baseline_is_paired_over_shared_subjects() -> None:
    scores = [
        _score("lora", "dog", 0.60, True), _score("lora", "can", 0.40, False), _score("lora", "vase", 0.5, False),
        _score("flat", "dog", 0.65, True), _score("flat", "can", 0.43, False),  # no vase
    ]
    references = [ReferenceScore("dog", 0.8, 0.9, 4, True), ReferenceScore("can", 0.7, 0.85, 4, False)]
    report = FidelityReport(scores, references, {}, baseline="lora")
    diff = report.differences()["flat"]["dino"]
    assert diff.n == 2
    assert diff.mean == pytest.approx(0.04)
    assert diff.sem == pytest.approx(0.01)  # std of (0.05, 0.03) / sqrt(2)
    assert report.real_summary()["dino"].mean == pytest.approx(0.75)
    table = report.markdown_table()
    assert "| lora (baseline) | 3 |" in table and "+0.040 ± 0.010" in table and "| Real images | 2 |" in table


def test_unknown_baseline_is_rejected() -> None:
    with pytest.raises(ValueError, match="`--baseline` `dora` is not one of the runs: lora"):
        FidelityReport([_score("lora", "dog", 0.6, True)], [], {}, baseline="dora")


def test_resize_and_crop_follow_torchvision() -> None:
    image = Image.new("RGB", (640, 480))
    resized = resize_shorter(image, 256)
    assert resized.size == (341, 256)  # int(256 * 640 / 480)
    assert resize_shorter(Image.new("RGB", (480, 640)), 256).size == (256, 341)
    assert center_crop(resized, 224).size == (224, 224)
    assert dino_preprocess() == Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert dino_preprocess(448).resize == 512  # the 256/224 ratio follows the model's input size


def test_preprocess_normalises_a_constant_image() -> None:
    pixels = clip_preprocess()(Image.new("RGB", (300, 200), (255, 0, 128)))
    assert pixels.shape == (3, 224, 224)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD, strict=True)]
    assert pixels.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-5)


def test_clip_preprocess_matches_clip_image_processor(tiny_clip_path, dreambench_dir) -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tiny_clip_path)  # OpenAI's settings
    image = Image.open(dreambench_dir / "images/dog/00.jpg")
    for crop in (image, image.crop((0, 0, 512, 300))):  # square and landscape
        expected = processor(crop, return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(clip_preprocess()(crop), expected, atol=1e-6)
