"""Resumable checkpoints: written to a temporary folder and renamed, so a kill never leaves half of one.

A checkpoint ``OUTPUT_DIR/checkpoint-STEP/`` holds::

    pytorch_lora_weights.safetensors  # the LoRA weights, in the final adapter's diffusers format:
    adapter_info.json                 #   `pipe.load_lora_weights(checkpoint)`, the eval and the app read it
    optimizer.pt              # optimiser state (tensors and numbers only: loaded with weights_only=True)
    lr_scheduler.pt           # learning-rate scheduler state
    scaler.pt                 # fp16 gradient scaler state (fp16 runs only)
    flat_lora.pt              # Flat-LoRA: the current draw and the O(m) inputs of its σ per layer (rho > 0)
    rng_state_<RANK>.pt       # python, numpy, torch (and CUDA) generator states of each process
    trainer_state.json        # step, epoch, position in the epoch, seed, ... -- written last

A checkpoint is written every ``--checkpointing_steps`` steps and at the last step, so that
``latest`` on a finished run finds it complete. The Flat-LoRA noise is a function of the seed and
the optimiser step, but its σ comes from the LoRA weights at the start of the draw: with
``--flat_interval`` > 1, a resume inside an interval needs that draw's σ, saved by the perturbers'
``state_dict()``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from flatlora_diffusion import files
from flatlora_diffusion.adapters import WEIGHTS_NAME

STATE_NAME = "trainer_state.json"
FLAT_LORA_NAME = "flat_lora.pt"
FORMAT_VERSION = 2  # 1: peft-named `lora.safetensors`
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY = re.compile(r"^\.checkpoint-\d+\.(tmp|deleting)$")  # `temporary_dir` and `remove`
_OLD_ADAPTER_TEMPORARY = re.compile(r"^\.adapter-[a-z0-9_]{8}$")  # what versions before files.scratch_dir left


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(value: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` means (``latest``: the newest, or None)."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value).expanduser()
    if not path.exists() and (Path(output_dir) / value).exists():
        path = Path(output_dir) / value  # a checkpoint name inside the output dir, as in diffusers
    if not path.is_dir():
        available = [p.name for p in list_checkpoints(output_dir)]
        hint = f" Checkpoints in `{output_dir}`: {', '.join(available)}." if available else ""
        raise CheckpointError(f"`--resume_from_checkpoint` `{value}` does not exist (or is not a folder).{hint} "
                              "Pass a `checkpoint-N` folder or `latest`.")
    return path


def read_state(path: Path) -> dict:
    """``trainer_state.json`` of a checkpoint, checked for the files every checkpoint has."""
    flag = f"`--resume_from_checkpoint` `{path}`"
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{flag} is not a complete checkpoint: `{STATE_NAME}` is missing (the save was "
                              "interrupted, or it is not a checkpoint folder). Use an older checkpoint.") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{flag} is corrupted: `{STATE_NAME}` is unreadable ({err}). Use an older "
                              "checkpoint.") from err
    version = state.get("format_version") if isinstance(state, dict) else None
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise CheckpointError(f"{flag} was written by an earlier version of this trainer (checkpoint format "
                              f"{version}, this one reads {FORMAT_VERSION}); resume it with that version, or start "
                              "a new run.")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{flag}: `{STATE_NAME}` is not a checkpoint state of this trainer.")
    missing = [name for name in (WEIGHTS_NAME, "optimizer.pt", "lr_scheduler.pt") if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{flag} is corrupted: {', '.join(f'`{m}`' for m in missing)} missing. "
                              "Use an older checkpoint.")
    return state


def load_tensors(path: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The checkpoint's LoRA tensors (diffusers names), checked against the names and shapes of the model's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    flag = f"`--resume_from_checkpoint` `{path}`"
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{flag} is corrupted: `{WEIGHTS_NAME}` cannot be read ({err}). Use an older "
                              "checkpoint.") from err
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {names[:3]}{'...' if len(names) > 3 else ''}" for what, names in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names)
        raise CheckpointError(f"{flag} does not match this run's LoRA layers ({detail}). Resume with the same "
                              "`--rank`, `--lora_target_modules`, `--train_text_encoder` and base model.")
    return tensors


def load_torch(path: Path, name: str):
    """A ``.pt`` file of the checkpoint (tensors and plain values only: no code is unpickled)."""
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle opcode, ...: all mean "corrupted"
        raise CheckpointError(f"`--resume_from_checkpoint` `{path}` is corrupted: `{name}` cannot be read "
                              f"({type(err).__name__}: {err}). Use an older checkpoint.") from err


def rng_state() -> dict:
    """This process's generator states, as tensors and plain lists (loadable with weights_only)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_dir(output_dir: Path, step: int) -> Path:
    """The hidden folder a checkpoint is written to before its rename (ignored by `latest`)."""
    return output_dir / f".checkpoint-{step}.tmp"


def publish(tmp: Path, final: Path) -> None:
    """Rename a fully written checkpoint into place (an older one of the same step is replaced)."""
    if final.exists():
        remove(final)
    os.replace(tmp, final)


def remove(path: Path) -> None:
    """Delete a checkpoint so that it is never seen half-deleted: rename it away first."""
    trash = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep``; returns the deleted ones."""
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - keep)]
    for path in doomed:
        remove(path)
    return doomed


def finished_message(path: Path, step: int, max_train_steps: int) -> str:
    """What a resume from a checkpoint at or past the last step says (nothing is trained)."""
    return (f"`--resume_from_checkpoint` `{path}`: the run is complete at step {step} (`--max_train_steps` "
            f"{max_train_steps}): nothing to train. To train further, raise `--max_train_steps` "
            f"above {step} and resume again.")


def clean_output_dir(output_dir: Path) -> list[Path]:
    """Delete the temporary files and folders that killed runs left in the output dir (only names this
    tool makes: hidden checkpoint and adapter folders, `files` temporaries, also in `validation/*/`)."""
    if not output_dir.is_dir():
        return []
    stale = [p for p in output_dir.iterdir() if _TEMPORARY.match(p.name) or _OLD_ADAPTER_TEMPORARY.match(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    folders = [output_dir, *sorted(p for p in (output_dir / "validation").glob("*") if p.is_dir())]
    return stale + [path for folder in folders for path in files.remove_stale(folder)]
