"""Host-side checks of loss inputs, run once per microbatch when it is packed (not inside the loss).

Owns the errors users see for malformed batches: mismatched shapes, split or non-contiguous groups,
non-finite rewards or anchor log-probs. Every message names the offending group (global group id when
known). These checks read tensor values, so the packer calls them before the schedule starts; the loss
itself stays free of host syncs.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from megatron_gift.algo.types import LossInputs, Tensor


class GroupSplitError(ValueError):
    """A group's sequences are not all in one microbatch (a loss on a partial group is wrong)."""


class NonFiniteError(ValueError):
    """A reward or log-prob is NaN or infinite."""


def _group_name(inputs: LossInputs, slot: int) -> str:
    if inputs.group_ids is None:
        return f"group slot {slot}"
    member = (inputs.group_index == slot).nonzero()
    gid = int(inputs.group_ids[member[0, 0]]) if member.numel() else slot
    return f"group {gid}"


def check_shapes(inputs: LossInputs, logprobs: Optional[Tensor] = None) -> None:
    """Every [B, T] tensor shares one shape, every [B] tensor has B entries."""
    bt = tuple(inputs.mask.shape)
    if len(bt) != 2:
        raise ValueError(f"mask must be [B, T], got shape {bt}")
    named = {"anchor_logprobs": inputs.anchor_logprobs, "ref_logprobs": inputs.ref_logprobs, "logprobs": logprobs}
    for name, t in named.items():
        if t is not None and tuple(t.shape) != bt:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask has {bt}")
    for name in ("rewards", "group_index", "group_ids"):
        t = getattr(inputs, name)
        if t is not None and tuple(t.shape) != (bt[0],):
            raise ValueError(f"{name} must have shape ({bt[0]},), got {tuple(t.shape)}")


def check_groups(inputs: LossInputs, expected_sizes: Optional[Sequence[int] | Tensor] = None) -> None:
    """Group slots are dense, contiguous and (when expected_sizes [G] is given) complete."""
    idx = inputs.group_index.cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= inputs.num_groups):
        raise ValueError(f"group_index values must lie in [0, {inputs.num_groups}), got [{int(idx.min())}, {int(idx.max())}]")
    if idx.numel() > 1 and bool((idx[1:] < idx[:-1]).any()):
        bad = int((idx[1:] < idx[:-1]).nonzero()[0, 0]) + 1
        raise GroupSplitError(f"sequences of a group must be contiguous; {_group_name(inputs, int(idx[bad]))} "
                              f"reappears at sequence {bad}")
    counts = torch.bincount(idx, minlength=inputs.num_groups)
    if bool((counts == 0).any()):
        raise ValueError(f"group slot {int((counts == 0).nonzero()[0, 0])} has no sequences")
    if expected_sizes is not None:
        expected = torch.as_tensor(expected_sizes, dtype=counts.dtype)
        if expected.shape != counts.shape:
            raise ValueError(f"expected_sizes has {expected.numel()} entries for {inputs.num_groups} groups")
        wrong = (counts != expected).nonzero()
        if wrong.numel():
            slot = int(wrong[0, 0])
            raise GroupSplitError(f"{_group_name(inputs, slot)} has {int(counts[slot])} of its {int(expected[slot])} "
                                  f"sequences in this microbatch: groups must never be split")


def check_finite(inputs: LossInputs) -> None:
    """Rewards and masked-in anchor / reference log-probs are finite; the error names the group."""
    bad = ~torch.isfinite(inputs.rewards)
    if bool(bad.any()):
        seq = int(bad.nonzero()[0, 0])
        raise NonFiniteError(f"non-finite reward {float(inputs.rewards[seq])} for sequence {seq} of "
                             f"{_group_name(inputs, int(inputs.group_index[seq]))}")
    for name in ("anchor_logprobs", "ref_logprobs"):
        t = getattr(inputs, name)
        if t is None:
            continue
        bad_tok = (~torch.isfinite(t)) & inputs.mask.bool()
        if bool(bad_tok.any()):
            seq, tok = (int(v) for v in bad_tok.nonzero()[0])
            raise NonFiniteError(f"non-finite {name} at sequence {seq}, token {tok} of "
                                 f"{_group_name(inputs, int(inputs.group_index[seq]))}")


def check_loss_inputs(inputs: LossInputs, expected_sizes=None, logprobs: Optional[Tensor] = None) -> None:
    """All host-side checks of one microbatch."""
    check_shapes(inputs, logprobs)
    check_groups(inputs, expected_sizes)
    check_finite(inputs)


def check_no_group_in_two(microbatch_group_ids: Iterable[Tensor]) -> None:
    """No global group id appears in more than one microbatch (or rank) of a global batch."""
    seen: dict[int, int] = {}
    for mb, ids in enumerate(microbatch_group_ids):
        for gid in torch.unique(ids.cpu()).tolist():
            if gid in seen:
                raise GroupSplitError(f"group {gid} is split across microbatches {seen[gid]} and {mb}")
            seen[gid] = mb
