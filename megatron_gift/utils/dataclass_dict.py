"""Build typed dataclass configs from plain dicts (YAML), rejecting unknown keys by name.

Owns one thing: the mapping dict -> dataclass with the error users see for a typo
("unknown key 'bta' in loss config; did you mean 'beta'?"). Validation of values stays in each
dataclass's __post_init__.
"""
from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Mapping, Type, TypeVar

T = TypeVar("T")


def nearest(name: str, candidates) -> str:
    """A ' did you mean ...?' suffix for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def from_dict(cls: Type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Instantiate dataclass `cls` from `data`; nested dataclass fields are built recursively.

    Raises KeyError-like ValueError naming the unknown key and the nearest valid one, and names
    missing required keys.
    """
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = dict(data or {})
    valid = {f.name: f for f in fields(cls) if f.init}
    for key in data:
        if key not in valid:
            raise ValueError(f"unknown key '{key}' in {where}{nearest(key, valid)} "
                             f"(valid keys: {', '.join(sorted(valid))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in valid.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"missing required key '{name}' in {where}")
            continue
        value, hint = data[name], hints.get(name)
        if is_dataclass(hint) and isinstance(value, Mapping):
            value = from_dict(hint, value, where=f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)
