"""Known-benign library messages are dropped, narrowly: the same loggers' other messages still show."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from conftest import captured_logs

from flatlora_diffusion.quiet import benign_warnings, no_lora_keys_notice

ROOT = Path(__file__).resolve().parents[1]


def test_torchvision_fallback_notice_is_dropped_on_import():
    """In a fresh process (transformers says it once per process): the package's import installs the filter."""
    code = ("import flatlora_diffusion, transformers; transformers.CLIPImageProcessor; transformers.SiglipImageProcessor; "
            "transformers.utils.logging.get_logger('transformers.utils.import_utils').warning('another notice')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
                            check=True)
    assert "requires torchvision" not in result.stderr
    assert "another notice" in result.stderr


def test_lora_keys_notice_dropped_only_for_the_named_prefixes():
    notice = "No LoRA keys associated to CLIPTextModel found with the prefix='{}'. This is safe to ignore if ..."
    with captured_logs("diffusers") as logs:
        logger = logging.getLogger("diffusers.loaders.lora_base")
        with no_lora_keys_notice(["text_encoder"]):
            logger.warning(notice.format("text_encoder"))
            logger.warning(notice.format("text_encoder_2"))
            logger.warning("Loading adapter weights ...")
        logger.warning(notice.format("text_encoder"))  # the block is over
    assert [line.split(": ", 1)[1][:68] for line in logs] == [
        "No LoRA keys associated to CLIPTextModel found with the prefix='text", "Loading adapter weights ...",
        "No LoRA keys associated to CLIPTextModel found with the prefix='text"]
    assert "prefix='text_encoder_2'" in logs[0] and "prefix='text_encoder'" in logs[2]


def test_benign_warnings_are_scoped_and_narrow():
    def warn(message: str, category: type[Warning]) -> None:
        warnings.warn_explicit(message, category, "modeling_utils.py", 1, module="transformers.modeling_utils")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with benign_warnings():
            warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warn("`something_else` is deprecated and will be removed in v6.", FutureWarning)
            warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", UserWarning)
        warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    shown = [(w.category, str(w.message).split("`")[1]) for w in caught]
    assert shown == [(FutureWarning, "something_else"), (UserWarning, "is_gradient_checkpointing"),
                     (FutureWarning, "is_gradient_checkpointing")]
