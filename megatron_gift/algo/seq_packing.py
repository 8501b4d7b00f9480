"""Packed sequences: several sequences of a microbatch share one row, with no attention across them.

Owns the packed layout of a Microbatch (pure torch, host side). The model sees rows (tokens,
position ids restarting at 0 for every sequence, next-token targets) while everything the loss reads
stays in the per-sequence [B, T] layout of `collate` (mask, anchor / rollout / ref log-probs), so the
per-sequence sums (GIFT's h_i, GRPO's token terms) are the same sums as on padded rows. The schedule
maps row log-probs back with `to_sequences` (a gather: gradients flow to the row positions).

Two modes:
- "rows": sequences first-fit-decreasing into rows of the microbatch's longest sequence (rounded up);
  attention is kept inside a sequence by a block-diagonal causal mask (`block_causal_mask`). Runs on
  any attention that takes a mask (the local spec on CPU).
- "thd": one row of every sequence back to back, each padded to `pad_to_multiple` tokens (what TP / CP /
  FP8 need), with cu_seqlens for Transformer Engine's THD attention (mcore/packed.py wires
  PackedSeqParams); without TE the same row runs with the block mask.
A microbatch holds whole groups (packing.py); packing never moves a sequence to another microbatch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import List, Optional

import torch

from megatron_gift.algo.types import Tensor

PACKING_MODES = ("rows", "thd")


@dataclass
class PackedLayout:
    """Where each sequence of a microbatch sits in its rows.

    mode: "rows" or "thd"; seq_index [B, T] int64: flat index (row * S + column) of token t of sequence i
    (positions past the sequence repeat its last token; the mask is 0 there); segment_ids [R, S] int64:
    the sequence in each slot, -1 for padding; lengths [B]: tokens per sequence; cu_seqlens /
    cu_seqlens_padded [B + 1] int32 and max_seqlen: the THD boundaries in the flattened row (real and padded).
    """

    mode: str
    seq_index: Tensor
    segment_ids: Tensor
    lengths: Tensor
    cu_seqlens: Tensor
    cu_seqlens_padded: Tensor
    max_seqlen: int

    def to(self, device) -> "PackedLayout":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _first_fit_rows(lengths: List[int], row_len: int) -> List[List[int]]:
    """Sequence indices per row, longest first into the first row with room (order kept inside a row)."""
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    return [sorted(r) for r in rows]


def pack_rows(mb, mode: str, *, pad_id: int = 0, pad_to_multiple: int = 8, row_len: Optional[int] = None):
    """A padded Microbatch (one sequence per row, from `collate`) -> the same microbatch packed (a new object)."""
    from megatron_gift.algo.packing import Microbatch
    if mode not in PACKING_MODES:
        raise ValueError(f"packing mode must be one of {PACKING_MODES}, got {mode!r}")
    lengths = [int(n) for n in mb.extras["seq_lengths"]]
    if mode == "rows":
        s = row_len or _round_up(max(lengths), pad_to_multiple)
        placement = _first_fit_rows(lengths, s)
        spans = list(lengths)
    else:
        spans = [_round_up(n, pad_to_multiple) for n in lengths]
        s = sum(spans)
        placement = [list(range(len(lengths)))]
    n_rows = len(placement)
    tokens = torch.full((n_rows, s), pad_id, dtype=torch.long)
    targets = torch.full((n_rows, s), pad_id, dtype=torch.long)
    positions = torch.zeros(n_rows, s, dtype=torch.long)
    segments = torch.full((n_rows, s), -1, dtype=torch.long)
    seq_index = torch.zeros(mb.tokens.shape, dtype=torch.long)
    starts = [0] * len(lengths)
    t = torch.arange(mb.tokens.shape[1])
    for r, members in enumerate(placement):
        offset = 0
        for i in members:
            n = lengths[i]
            tokens[r, offset:offset + n] = mb.tokens[i, :n]
            targets[r, offset:offset + n] = mb.targets[i, :n]
            positions[r, offset:offset + n] = torch.arange(n)
            segments[r, offset:offset + n] = i
            seq_index[i] = r * s + offset + t.clamp(max=n - 1)
            starts[i] = r * s + offset
            offset += spans[i]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_padded = torch.tensor([0] + spans, dtype=torch.int32).cumsum(0).to(torch.int32)
    layout = PackedLayout(mode=mode, seq_index=seq_index, segment_ids=segments, lengths=torch.tensor(lengths),
                          cu_seqlens=cu, cu_seqlens_padded=cu_padded, max_seqlen=max(spans))
    return Microbatch(tokens=tokens, position_ids=positions, targets=targets, loss_inputs=mb.loss_inputs,
                      group_sizes=mb.group_sizes, rollout_logprobs=mb.rollout_logprobs, extras=dict(mb.extras),
                      packed=layout)


def to_sequences(row_values: Tensor, layout: PackedLayout) -> Tensor:
    """Row values [R, S] -> the per-sequence layout [B, T] (differentiable gather)."""
    return row_values.reshape(-1)[layout.seq_index]


def block_causal_mask(segment_ids: Tensor) -> Tensor:
    """[R, 1, S, S] bool, True where attention is NOT allowed: another sequence, or a later position.

    Padding slots (-1) form one causal block of their own, so no query row is fully masked.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal)[:, None]


def padding_fraction(mbs) -> float:
    """Share of the model's token slots (rows x S over all microbatches) that hold no real token."""
    slots = sum(mb.tokens.numel() for mb in mbs)
    real = sum(int(mb.extras["seq_lengths"].sum()) for mb in mbs)
    return 1.0 - real / slots if slots else 0.0
