"""DreamBench subjects, classes and prompts; identifier removal; prompts for image folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.dreambench import DreamBench, parse_prompts_file, remove_identifier
from eval.errors import EvalError
from eval.folders import prompt_from_filename, read_prompts

CLASSES = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock",
    "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog",
    "dog7": "dog", "dog8": "dog", "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy", "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy",
    "red_cartoon": "cartoon", "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}
LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


@pytest.fixture(scope="module")
def bench(dreambench_dir: Path) -> DreamBench:
    return DreamBench(dreambench_dir)


def test_class_nouns_of_all_30_subjects(bench: DreamBench) -> None:
    assert {name: s.class_noun for name, s in bench.subjects.items()} == CLASSES
    assert {name for name, s in bench.subjects.items() if s.live} == LIVE
    assert sum(len(bench.subject(n).images) for n in CLASSES) == 158


def test_objects_get_25_prompts(bench: DreamBench) -> None:
    prompts = bench.subject("backpack").prompts()
    assert len(prompts) == len(set(prompts)) == 25
    assert prompts[0] == "a sks backpack in the jungle"
    assert prompts[-1] == "a cube shaped sks backpack"
    assert not any("wearing" in p for p in prompts)


def test_live_subjects_get_25_prompts(bench: DreamBench) -> None:
    prompts = bench.subject("dog2").prompts()
    assert len(prompts) == len(set(prompts)) == 25
    assert "a sks dog wearing a red hat" in prompts and "a sks dog in a purple wizard outfit" in prompts
    assert sum("wearing" in p or "outfit" in p for p in prompts) == 10  # the accessory prompts


def test_every_prompt_names_identifier_and_class(bench: DreamBench) -> None:
    for subject in bench.subjects.values():
        for prompt in subject.prompts("zwx"):
            assert f"zwx {subject.class_noun}" in prompt
            assert "zwx" not in remove_identifier(prompt, "zwx")


def test_identifier_removal() -> None:
    assert remove_identifier("a sks dog in the jungle", "sks") == "a dog in the jungle"
    assert remove_identifier("a cube shaped sks stuffed animal", "sks") == "a cube shaped stuffed animal"
    assert remove_identifier("a sksx dog", "sks") == "a sksx dog"  # whole words only


def test_unknown_subjects_are_named(bench: DreamBench) -> None:
    with pytest.raises(EvalError, match=r"`dog4`, `unicorn` not in the DreamBench dataset.*Available: backpack"):
        bench.select(["dog", "dog4", "unicorn"])
    assert [s.name for s in bench.select(["cat", "vase"])] == ["cat", "vase"]


def test_not_a_dreambench_folder(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="has no `prompts_and_classes.txt`"):
        DreamBench(tmp_path)
    bad = tmp_path / "prompts_and_classes.txt"
    bad.write_text("Classes\n\nsubject_name,class\ndog,dog\n")
    with pytest.raises(EvalError, match="0 object prompts instead of 25"):
        parse_prompts_file(bad)


def test_prompt_from_filename() -> None:
    assert prompt_from_filename("a_sks_dog_in_the_snow_003.png") == "a sks dog in the snow"
    assert prompt_from_filename("a red sks dog-12.jpg") == "a red sks dog"


def test_prompt_file_lines_match_images_in_natural_order(tmp_path: Path) -> None:
    files = [tmp_path / f"img{i}.png" for i in (1, 2, 10)]
    (tmp_path / "p.txt").write_text("one\ntwo\nten\n\n")
    assert read_prompts(tmp_path / "p.txt", files) == ["one", "two", "ten"]
    (tmp_path / "p.json").write_text('{"img1.png": "one", "img2.png": "two", "img10.png": "ten"}')
    assert read_prompts(tmp_path / "p.json", files) == ["one", "two", "ten"]


def test_prompt_file_of_wrong_length(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    with pytest.raises(EvalError, match="`--prompts` file .* has 2 prompts but the folder has 3 images"):
        read_prompts(tmp_path / "p.txt", [tmp_path / f"{i}.png" for i in range(3)])
    (tmp_path / "p.json").write_text('{"0.png": "x"}')
    with pytest.raises(EvalError, match="no prompt for 1 image"):
        read_prompts(tmp_path / "p.json", [tmp_path / "0.png", tmp_path / "1.png"])
