"""Pieces shared by the typed config dataclasses (DreamBooth, LLM and eval settings)."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import field, fields


def help_field(default, help: str, **extra):
    """A dataclass field carrying its help text (and optional `choices`) in its metadata."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def type_ok(value, hint) -> bool:
    """Whether `value` fits a simple annotation: str/int/float/bool, `X | None`, `list[X]`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_errors(obj, label: Callable[[str], str], type_name: Callable[[object], str]) -> list[str]:
    """One message per field of dataclass ``obj`` whose value does not fit its annotation.

    ``label`` turns a field name into what the user typed (e.g. ``--rank``), ``type_name`` an
    annotation into words (e.g. ``an integer``).
    """
    hints = typing.get_type_hints(type(obj))
    return [
        f"`{label(f.name)}` must be {type_name(hints[f.name])}, got {getattr(obj, f.name)!r}."
        for f in fields(obj)
        if not type_ok(getattr(obj, f.name), hints[f.name])
    ]
