"""The app's command line and Gradio wiring, without a browser (the browser test is test_app_browser.py)."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import gradio as gr
import pytest
import yaml

from flatlora_diffusion import app_ui
from flatlora_diffusion.app_studio import StudioError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_demo_run_and_localhost():
    args = app_ui.parse_args([])
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert args.base == demo["pretrained_model_name_or_path"] == "toy:sd"
    assert args.adapters == [demo["output_dir"]] == ["outputs/demo"]
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)


def test_entry_script_starts_the_studio(tiny_sd_path, sd_adapter_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(sd_adapter_dir, tmp_path / "runs" / "dog")
    launched = {}
    monkeypatch.setattr(app_ui, "launch", lambda studio, **kw: launched.update(studio=studio, **kw))
    monkeypatch.setattr(sys, "argv", ["app.py", "--base", str(tiny_sd_path), "--adapters", str(tmp_path / "runs"),
                                      "--port", "7999", "--max-steps", "30"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert (launched["host"], launched["port"], launched["share"]) == ("127.0.0.1", 7999, False)
    studio = launched["studio"]
    assert list(studio.adapters) == ["dog"] and studio.limits.max_steps == 30
    assert not studio.out_dir.exists(), "the images written by the app are removed when it stops"
    assert "1 adapter(s) found" in capsys.readouterr().out


def test_bad_base_model_exits_with_the_fix(tmp_path, capsys):
    assert app_ui.main(["--base", str(tmp_path), "--adapters", str(tmp_path)]) == 2
    assert "`model_index.json` is missing" in capsys.readouterr().err


def test_no_adapter_yet_says_how_to_train_one(tiny_sd_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(app_ui, "launch", lambda studio, **kw: None)
    assert app_ui.main(["--base", str(tiny_sd_path), "--adapters", str(tmp_path / "outputs" / "demo"),
                        "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert "train one with `python train_dreambooth_flatlora.py --config configs/demo.yaml`" in out
    assert "WARNING: the app is reachable beyond this machine (0.0.0.0)" in out


def test_errors_become_popups_without_stack_traces():
    def refuse():
        raise StudioError("`steps` must be an integer in [1, 100], got 500.")

    def crash():
        raise RuntimeError("CUDA error at /secret/path")

    def oom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 20 GiB")

    with pytest.raises(gr.Error, match=r"`steps` must be an integer in \[1, 100\], got 500."):
        app_ui.ui_errors(refuse)()
    with pytest.raises(gr.Error) as info:
        app_ui.ui_errors(crash)()
    assert info.value.message == "Sampling failed (RuntimeError); the server log has the details."
    with pytest.raises(gr.Error, match="Lower the width/height or the number of images"):
        app_ui.ui_errors(oom)()


def test_page_builds_with_one_slider_per_selectable_adapter(tiny_sd_path, tmp_path):
    from flatlora_diffusion.app_studio import Studio

    studio = Studio.open(str(tiny_sd_path), [tmp_path], out_dir=tmp_path / "out")
    demo = app_ui.build_demo(studio)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"prompt", "generate", "gallery", "adapters", "scale-0", "scale-3"} <= ids
    limits = {fn.name: fn.concurrency_limit for fn in demo.fns.values()}
    assert limits["generate"] == 1 and limits["assign"] is None  # generations queue; UI updates never wait
    assert demo._queue.max_size == app_ui.QUEUE_SIZE
    assert "No adapter found" in studio.describe()
