"""A resumable prompt sampler: seeded shuffle per epoch, exact position, state dict (L1).

Owns the order in which prompts are drawn. The permutation of epoch e is a pure function of
(seed, epoch, dataset size), computed with a fixed integer hash (splitmix64) rather than a library RNG,
so a saved position means the same prompts after a restart or a numpy / torch upgrade.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Positions 0..num_items-1 in the order epoch `epoch` visits them."""
    positions = np.arange(num_items, dtype=np.int64)
    if not shuffle:
        return positions
    key = _splitmix64(np.array([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF], dtype=np.uint64))
    salt = _splitmix64(np.array([key[0] ^ (key[1] << np.uint64(1))], dtype=np.uint64))[0]
    keys = _splitmix64(positions.astype(np.uint64) ^ salt)
    return np.argsort(keys, kind="stable")


class PromptSampler:
    """Draws prompts from `items` (anything indexable with len) epoch after epoch.

    `fingerprint` identifies the dataset content (PromptDataset.fingerprint); a state saved for another
    dataset, size or seed is refused when loaded.
    """

    def __init__(self, items: Sequence[Any], seed: int, shuffle: bool = True,
                 fingerprint: Optional[str] = None) -> None:
        if len(items) == 0:
            raise ValueError("prompt sampler: the dataset is empty")
        self.items = items
        self.seed = int(seed)
        self.shuffle = shuffle
        self.fingerprint = fingerprint if fingerprint is not None else getattr(items, "fingerprint", "")
        self.epoch = 0
        self.position = 0  # next position inside the current epoch's order
        self._order = epoch_order(len(items), self.seed, 0, shuffle)

    def _set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = epoch_order(len(self.items), self.seed, epoch, self.shuffle)

    def next_indices(self, n: int) -> list[int]:
        """Positions (into `items`) of the next n prompts, moving to the next epoch when one ends."""
        if n < 0:
            raise ValueError(f"prompt sampler: batch size must be >= 0, got {n}")
        out: list[int] = []
        while len(out) < n:
            if self.position == len(self._order):
                self._set_epoch(self.epoch + 1)
                self.position = 0
            take = min(n - len(out), len(self._order) - self.position)
            out.extend(int(i) for i in self._order[self.position:self.position + take])
            self.position += take
        return out

    def next_batch(self, n: int) -> list[Any]:
        """The next n prompts (crossing epoch boundaries as needed)."""
        return [self.items[i] for i in self.next_indices(n)]

    @property
    def consumed(self) -> int:
        """Prompts drawn so far over all epochs."""
        return self.epoch * len(self.items) + self.position

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "num_items": len(self.items),
                "fingerprint": self.fingerprint, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; a state from another dataset / seed is an error naming the field."""
        expected = {"seed": self.seed, "shuffle": self.shuffle, "num_items": len(self.items),
                    "fingerprint": self.fingerprint}
        for key, value in expected.items():
            if key not in state:
                raise ValueError(f"prompt sampler state: missing key {key!r}")
            if state[key] != value:
                hint = (" (the fingerprint covers the kept rows and their token ids: a changed file, tokenizer, "
                        "chat template or max_prompt_tokens changes it)" if key == "fingerprint" else "")
                raise ValueError(f"prompt sampler state was saved with {key}={state[key]!r} but this run has "
                                 f"{key}={value!r}: it belongs to a different dataset or seed{hint}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.items):
            raise ValueError(f"prompt sampler state: epoch {epoch} / position {position} out of range "
                             f"for {len(self.items)} prompts")
        self._set_epoch(epoch)
        self.position = position
