"""Evaluation data: local JSONL(.gz) files, or hub datasets through `datasets` (offline errors say what to do)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from eval.errors import EvalError


def read_jsonl(path: Path, fields: tuple[str, ...], flag: str = "--data") -> list[dict]:
    """Rows of a JSONL (optionally .gz) file, each with `fields`; errors name the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"`{flag}` `{path}` line {number} is not JSON: {err.msg}.") from err
            missing = [f for f in fields if f not in row]
            if missing:
                raise EvalError(f"`{flag}` `{path}` line {number} lacks {', '.join(f'`{f}`' for f in missing)}.")
            rows.append(row)
    if not rows:
        raise EvalError(f"`{flag}` `{path}` has no examples.")
    return rows


def load_rows(data: str, fields: tuple[str, ...], config_name: str | None = None, split: str = "test") -> list[dict]:
    """Examples from a local JSONL(.gz) file, or from a hub dataset through `datasets`."""
    path = Path(data).expanduser()
    if path.exists():
        return read_jsonl(path, fields)
    if data.startswith(("/", ".", "~")) or data.endswith((".jsonl", ".gz", ".json")):
        raise EvalError(f"`--data` file `{data}` does not exist.")
    try:
        from datasets import load_dataset

        dataset = load_dataset(data, config_name, split=split) if config_name else load_dataset(data, split=split)
    except Exception as err:  # datasets raises many types for offline / unknown names
        raise EvalError(
            f"Could not load the hub dataset `{data}` (`--data`): {str(err).strip().splitlines()[0]}\n"
            "Offline, export it once to JSONL and pass the file: `--data test.jsonl`."
        ) from err
    rows = [dict(row) for row in dataset]
    missing = [f for f in fields if rows and f not in rows[0]]
    if missing:
        raise EvalError(f"Hub dataset `{data}` lacks the fields {', '.join(f'`{f}`' for f in missing)}.")
    return rows
