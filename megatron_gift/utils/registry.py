"""A name -> entry registry, shared by the losses (algo/registry.py) and the rewards (rewards/registry.py).

Owns the rules every registry of this project follows: a name is registered once, the valid names are
listed sorted, and an unknown name is a one-line error naming the kind, the nearest valid name and
all valid names.
"""
from __future__ import annotations

from typing import Dict, Generic, List, Mapping, Optional, TypeVar

from megatron_gift.utils.dataclass_dict import nearest

T = TypeVar("T")


class Registry(Generic[T]):
    """`kind` / `plural` name the registered things in errors ("loss" / "losses"); `hint` is appended to
    the unknown-name error's list of valid names (e.g. another way to name one)."""

    def __init__(self, kind: str, plural: str, entries: Optional[Mapping[str, T]] = None, hint: str = ""):
        self.kind, self.plural, self.hint = kind, plural, hint
        self._entries: Dict[str, T] = dict(entries or {})

    def register(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} '{name}'{nearest(name, self._entries)} "
                             f"(valid {self.plural}: {', '.join(self.names())}{self.hint})")
        return self._entries[name]
