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
    mismatch = None
    for name, f in valid.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"missing required key '{name}' in {where}")
            continue
        value, hint = data[name], hints.get(name)
        if is_dataclass(hint) and isinstance(value, Mapping):
            value = from_dict(hint, value, where=f"{where}.{name}")
        else:
            value = coerce_scalar(value, hint)
            wrong = wrong_type(value, hint, _key(where, name))
            mismatch = mismatch or wrong
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError:  # e.g. '<=' between str and int inside __post_init__: name the key instead
        if mismatch:
            raise ValueError(mismatch) from None
        raise
    if mismatch:  # the dataclass accepted it, but the annotation says otherwise
        raise ValueError(mismatch)
    return obj


def _key(where: str, name: str) -> str:
    """The dotted key users write (`optim.lr`), without the top-level 'run config' label."""
    for label in ("run config.", "run config"):
        if where.startswith(label):
            where = where[len(label):]
            break
    return f"{where}.{name}" if where and " " not in where else (f"{name} in {where}" if where else name)


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar_hint(hint: Any):
    """(bool / int / float / str, optional?) for such an annotation (possibly Optional), else (None, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0], True) if len(rest) == 1 and rest[0] in _SCALARS else (None, False)
    return (hint, False) if hint in _SCALARS else (None, False)


def coerce_scalar(value: Any, hint: Any) -> Any:
    """Numbers as `--set` reads them: a string that reads as a number for a float field, an int for a float
    field, an integral float (`1e3`) for an int field. Anything else is returned unchanged."""
    kind, _ = _scalar_hint(hint)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def wrong_type(value: Any, hint: Any, key: str):
    """An error message naming `key` when `value` does not have the annotated scalar type, else None."""
    kind, optional = _scalar_hint(hint)
    if kind is None or (optional and value is None):
        return None
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return None
    return (f"{key} must be {_SCALARS[kind]}{' or null' if optional else ''}, got {value!r} "
            f"({type(value).__name__})")
