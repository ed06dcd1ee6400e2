"""Known-benign messages of the libraries we use, filtered narrowly and in one place.

Each entry names who emits the message, matches its text (and category), and says why it is
benign here; anything else is shown as usual. Messages whose cause is ours are fixed where they
arise instead (e.g. the transformers 5 argument names in `flatlora_diffusion.llm.train`).

    install_log_filters()                        # process-wide; done when the package is imported
    with benign_warnings(): get_peft_model(...)  # warnings filters are scoped to the call that warns
    with no_lora_keys_notice(["text_encoder"]): pipe.load_lora_weights(...)

Logging filters attach to the emitting logger by name, so nothing here imports transformers or
diffusers.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# (logger, message pattern, why it is benign)
LOG_LINES = (
    ("transformers.utils.import_utils",
     r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",
     "torchvision does not work beside the CPU torch wheel; the Pillow image processors are the ones we use"),
    ("transformers.trainer_utils", r"mtime may not be reliable on this filesystem, falling back to numerical ordering",
     "tiny runs write checkpoints less than a second apart; `checkpoint-N` in numerical order is the right order"),
)
# (category, message pattern, emitting module, why it is benign)
WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils",
     "peft (<= 0.21) reads the attribute's transformers 4 name while wrapping a model; nothing of ours uses it"),
    (UserWarning, r"Already found a `peft_config` attribute in the model", r"peft\.tuners\.tuners_utils",
     "a second adapter loaded on purpose into one pipeline (the flatness meter measures several on one base)"),
)
_LORA_KEYS_LOGGER = "diffusers.loaders.lora_base"


class _Drop(logging.Filter):
    """Drops the records whose message matches `pattern` (from its start)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install_log_filters() -> None:
    """Drop the `LOG_LINES` on their loggers (idempotent)."""
    for name, pattern, _ in LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))


@contextmanager
def benign_warnings() -> Iterator[None]:
    """Ignore the `WARNINGS` inside the block (other warnings pass as usual)."""
    with warnings.catch_warnings():
        for category, message, module, _ in WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


@contextmanager
def no_lora_keys_notice(prefixes: Iterable[str]) -> Iterator[None]:
    """Drop diffusers' "No LoRA keys associated to ..." notice for these component prefixes inside the block.

    For a component the adapter file is known to have no weights for (a UNet-only adapter and the
    text encoders), diffusers says so on every load; for any other prefix the notice still shows.
    """
    names = "|".join(re.escape(p) for p in prefixes)
    if not names:
        yield
        return
    drop = _Drop(rf"No LoRA keys associated to \w+ found with the prefix='({names})'\.")
    logger = logging.getLogger(_LORA_KEYS_LOGGER)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
