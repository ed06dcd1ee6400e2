"""Fidelity scoring end to end with the tiny CLIP and DINO models on real DreamBench images, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval import cli, metrics
from eval.config import ConfigError, FidelityConfig, ScoringConfig
from eval.embedders import ImageEmbedder, load_clip
from eval.errors import EvalError
from eval.fidelity import FidelityScorer
from eval.folders import prepare_folders, score_job
from eval.preprocess import clip_preprocess
from flatlora_diffusion.files import atomic_open


@pytest.fixture(scope="module")
def scoring_config(tiny_clip_path: Path, tiny_dino_path: Path, tmp_path_factory: pytest.TempPathFactory) -> ScoringConfig:
    return ScoringConfig(dino_model=str(tiny_dino_path), clip_model=str(tiny_clip_path), device="cpu",
                         cache_dir=str(tmp_path_factory.mktemp("embedding_cache")))


@pytest.fixture(scope="module")
def scorer(scoring_config: ScoringConfig) -> FidelityScorer:
    return FidelityScorer(scoring_config)


@pytest.fixture
def generated(dreambench_dir: Path, tmp_path: Path) -> Path:
    """Four "generated" images of `dog` (real images of `dog2`) named after their prompts."""
    out = tmp_path / "generated"
    out.mkdir()
    prompts = ["a red sks dog", "a sks dog in the jungle", "a sks dog in the snow", "a sks dog on the beach"]
    for i, prompt in enumerate(prompts):
        shutil.copy(dreambench_dir / f"images/dog2/0{i}.jpg", out / f"{prompt.replace(' ', '_')}_{i:03d}.jpg")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")  # natural order of the names above
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _models(config: ScoringConfig) -> list[str]:
    return ["--dino_model", config.dino_model, "--clip_model", config.clip_model, "--device", "cpu",
            "--cache_dir", config.cache_dir]


def test_fidelity_cli_writes_the_metrics(generated, dreambench_dir, scoring_config, tmp_path, capsys) -> None:
    out = tmp_path / "dog.json"
    code, stdout, _ = _run(["fidelity", "--generated", str(generated), "--reference", str(dreambench_dir / "images/dog"),
                            "--prompts", str(tmp_path / "prompts.txt"), "--json", str(out),
                            *_models(scoring_config)], capsys)
    assert code == 0
    result = json.loads(out.read_text())
    assert json.loads(stdout)["dino"] == result["dino"]
    assert {"dino", "clip_i", "clip_t", "n_generated", "n_reference", "n_skipped", "real_images"} <= set(result)
    assert (result["n_generated"], result["n_reference"], result["n_skipped"]) == (4, 5, 0)
    for key in ("dino", "clip_i", "clip_t"):
        assert -1 <= result[key] <= 1
    assert result["models"]["dino"]["preprocess"]["resize"] == 256
    assert result["models"]["clip_t_prompt"] == "identifier `sks` removed"
    assert result["environment"]["packages"]["torch"] == torch.__version__.split("+")[0] or torch.__version__
    assert len(result["images"]) == 4 and result["images"][1]["prompt"] == "a sks dog in the jungle"


def test_scores_match_a_direct_computation(generated, dreambench_dir, scorer, scoring_config, tmp_path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    job = prepare_folders(generated, dreambench_dir / "images/dog", prompt_from_filenames=True)
    score, _ = score_job(scorer, job)
    model = CLIPModel.from_pretrained(scoring_config.clip_model).eval()
    tokenizer = CLIPTokenizer.from_pretrained(scoring_config.clip_model)
    pixels = clip_preprocess().batch([Image.open(p) for p in job.generated.files])
    texts = ["a red dog", "a dog in the jungle", "a dog in the snow", "a dog on the beach"]  # identifier removed
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokenizer(texts, padding=True, return_tensors="pt"))
    assert score.clip_t == pytest.approx(metrics.matched_pairs_similarity(out.image_embeds, out.text_embeds), abs=1e-5)
    assert score.clip_t != pytest.approx(metrics.all_pairs_similarity(out.image_embeds, out.text_embeds), abs=1e-5)


def test_identical_folders(dreambench_dir, scorer) -> None:
    job = prepare_folders(dreambench_dir / "images/cat", dreambench_dir / "images/cat")
    score, real = score_job(scorer, job)
    n = score.n_generated
    # All pairs include the n self-pairs (cosine 1) besides the n(n-1) pairs of the real-images row.
    assert score.dino == pytest.approx((n + n * (n - 1) * real.dino) / n**2)
    assert score.clip_i == pytest.approx((n + n * (n - 1) * real.clip_i) / n**2)
    assert score.clip_t is None  # no prompts, no CLIP-T


def test_embeddings_are_cached_by_file_content(dreambench_dir, scoring_config, tmp_path, monkeypatch) -> None:
    copy = tmp_path / "renamed"
    shutil.copytree(dreambench_dir / "images/vase", copy)
    first, _ = score_job(FidelityScorer(scoring_config), prepare_folders(copy, dreambench_dir / "images/vase"))

    def no_forward(self, *args):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(ImageEmbedder, "embed_images", no_forward)
    for path in copy.iterdir():  # new names, same content
        path.rename(path.with_name("x" + path.name))
    again, _ = score_job(FidelityScorer(scoring_config), prepare_folders(copy, dreambench_dir / "images/vase"))
    assert (again.dino, again.clip_i) == (first.dino, first.clip_i)


def test_cache_key_changes_with_the_weights(scoring_config, tiny_clip_path, tmp_path) -> None:
    from eval.cache import model_fingerprint

    clip = load_clip(str(tiny_clip_path), torch.device("cpu"), torch.float32)
    before = model_fingerprint(clip.model)
    with torch.no_grad():
        clip.model.visual_projection.weight[0, 0] += 1
    assert model_fingerprint(clip.model) != before


def test_bad_files_are_skipped_named_and_counted(generated, dreambench_dir, scoring_config, tmp_path, capsys) -> None:
    (generated / "notes.txt").write_text("not an image")
    (generated / "zz_broken_999.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning) as caught:
        code, _, _ = _run(["fidelity", "--generated", str(generated), "--reference", str(dreambench_dir / "images/dog"),
                           "--prompt_from_filenames", "--json", str(out), *_models(scoring_config)], capsys)
    assert code == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "notes.txt" in messages and "zz_broken_999.png" in messages
    result = json.loads(out.read_text())
    assert (result["n_generated"], result["n_skipped"]) == (4, 2)
    assert {Path(s["path"]).name: s["reason"].split(" (")[0] for s in result["skipped"]} == {
        "notes.txt": "not an image file", "zz_broken_999.png": "unreadable image"}


def test_bad_input_messages(generated, dreambench_dir, scoring_config, tiny_dino_path, tmp_path, capsys) -> None:
    ref = str(dreambench_dir / "images/dog")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "contains no images": ["--generated", str(empty), "--reference", ref],
        "does not exist or is not a directory": ["--generated", str(tmp_path / "nope"), "--reference", ref],
        "has 1 prompts but the folder has 4 images": ["--generated", str(generated), "--reference", ref,
                                                      "--prompts", str(_write(tmp_path / "p.txt", "one\n"))],
        "is a `vit` model, not one of clip": ["--generated", str(generated), "--reference", ref,
                                              "--clip_model", str(tiny_dino_path)],
        "`--dino_model` folder `./no/such/dino` does not exist": ["--generated", str(generated), "--reference", ref,
                                                                  "--dino_model", "./no/such/dino"],
    }
    for expected, argv in cases.items():
        code, _, err = _run(["fidelity", *_models(scoring_config), *argv], capsys)
        assert code == 2 and expected in err, (expected, err)


def test_offline_hub_id_says_how_to_provide_the_model(monkeypatch) -> None:
    import huggingface_hub.constants

    from eval.embedders import load_dino

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EvalError, match=r"(?s)DINO model `facebook/dino-vits16` \(`--dino_model`\).*hf download.*"
                                        r"`--dino_model /path/to/model`"):
        load_dino("facebook/dino-vits16", torch.device("cpu"), torch.float32)


def test_config_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        FidelityConfig(generated="a", batch_size=0, dtype="float64", identifier="two words", prompts="p.txt",
                       prompt_from_filenames=True)
    text = str(info.value)
    for fragment in ("`batch_size` must be >= 1", "`dtype` must be one of", "`identifier` must be one word",
                     "Give both `--generated DIR` and `--reference DIR`", "either `--prompts FILE` or"):
        assert fragment in text
    with pytest.raises(ConfigError, match="`batch_size` must be of type int"):
        ScoringConfig(batch_size="8")


def test_manifest_compares_runs(dreambench_dir, scoring_config, tmp_path, capsys) -> None:
    rows = ["run,subject,generated,reference,prompts,live"]
    for run, source in (("lora", "dog2"), ("flat", "dog3")):
        for subject, live in (("dog", "true"), ("can", "false")):
            folder = tmp_path / run / subject
            folder.mkdir(parents=True)
            for i in range(2):
                shutil.copy(dreambench_dir / f"images/{source}/0{i}.jpg", folder / f"{i}.jpg")
            _write(folder / "prompts.txt", f"a sks {subject} in the snow\na sks {subject} on the beach\n")
            rows.append(f"{run},{subject},{run}/{subject},{dreambench_dir}/images/{subject},{run}/{subject}/prompts.txt,{live}")
    _write(tmp_path / "runs.csv", "\n".join(rows) + "\n")
    out = tmp_path / "report"
    code, stdout, _ = _run(["fidelity", "--manifest", str(tmp_path / "runs.csv"), "--out", str(out),
                            "--baseline", "lora", *_models(scoring_config)], capsys)
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"results.json", "per_subject.csv", "summary.csv", "report.md", "metrics.png", "grid_dog.png",
                     "grid_can.png"}
    results = json.loads((out / "results.json").read_text())
    assert results["runs"] == ["lora", "flat"] and results["baseline"] == "lora"
    assert set(results["summary"]) == {"all", "objects", "live"}
    flat = results["summary"]["all"]["runs"]["flat"]["dino"]
    lora_rows = {s["subject"]: s["dino"] for s in results["subjects"] if s["run"] == "lora"}
    flat_rows = {s["subject"]: s["dino"] for s in results["subjects"] if s["run"] == "flat"}
    assert flat["n_subjects"] == 2
    assert flat["diff_to_baseline"]["mean"] == pytest.approx(sum(flat_rows[s] - lora_rows[s] for s in lora_rows) / 2)
    assert "| lora (baseline) | 2 |" in stdout and "Δ DINO" in stdout
    assert "![Samples: dog](grid_dog.png)" in (out / "report.md").read_text()
    assert Image.open(out / "metrics.png").size[0] > 300
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # `report` re-renders the saved results against another baseline.
    code, stdout, _ = _run(["report", str(out / "results.json"), "--baseline", "flat"], capsys)
    assert code == 0 and "| flat (baseline) | 2 |" in stdout


def test_manifest_problems_are_reported_before_scoring(tmp_path, scoring_config, capsys) -> None:
    _write(tmp_path / "m.jsonl", '{"run": "a", "subject": "dog", "generated": "g", "reference": "r"}\n'
                                 '{"run": "a", "subject": "dog", "generated": "g"}\n')
    code, _, err = _run(["fidelity", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"),
                         *_models(scoring_config)], capsys)
    assert code == 2 and "row 2: missing `reference`" in err
    assert not (tmp_path / "o").exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
