"""The shipped copy of the tiny demo task (arithmetic train / eval jsonl and its tokenizer directory).

Owns the generator arguments of the shipped files and their paths. The files are produced by
`regenerate()` (python -m megatron_gift.data.builtin.regenerate) and a test checks they still equal a fresh run.
Packaging note: setup.py must list them as package data (data/builtin/arithmetic/**) for wheel installs.
"""
from __future__ import annotations

import os

from megatron_gift.data.arithmetic import make_arithmetic_dataset, make_arithmetic_tokenizer

BUILTIN_ARITHMETIC = {"n_train": 2000, "n_eval": 200, "seed": 1234}
ARITHMETIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arithmetic")


def builtin_arithmetic_paths() -> dict[str, str]:
    """split -> jsonl path ('train', 'eval') and 'tokenizer' -> tokenizer directory."""
    paths = {split: os.path.join(ARITHMETIC_DIR, f"{split}.jsonl") for split in ("train", "eval")}
    paths["tokenizer"] = os.path.join(ARITHMETIC_DIR, "tokenizer")
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"shipped demo data missing: {missing[0]} (run python -m megatron_gift.data.builtin.regenerate)")
    return paths


def regenerate(out_dir: str = ARITHMETIC_DIR) -> dict[str, str]:
    """Write the shipped files again (same arguments, same bytes)."""
    paths = make_arithmetic_dataset(out_dir, **BUILTIN_ARITHMETIC)
    paths["tokenizer"] = make_arithmetic_tokenizer(os.path.join(out_dir, "tokenizer"))
    return paths
