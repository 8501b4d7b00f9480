"""Group-atomic packing of rollouts into padded microbatches (pure torch, host side).

Owns: how one rank's share of a global batch of prompt groups becomes microbatches of whole groups,
with next-token targets and the response mask aligned to them. It never splits a group: a group that
does not fit the token budget is an error that points at the two-pass schedule.

Token layout of a sequence: prompt ids then response ids, right-padded. Position t predicts token t+1,
so targets[t] = tokens[t+1] and mask[t] = 1 exactly when tokens[t+1] is a response token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Sequence

import torch

from megatron_gift.algo.validate import GroupSplitError
from megatron_gift.algo.types import LossInputs, Tensor

if TYPE_CHECKING:  # seq_packing imports this module
    from megatron_gift.algo.seq_packing import PackedLayout


@dataclass
class RolloutGroup:
    """One prompt's N sampled responses with their rewards (host tensors).

    prompt [P] int64; responses: N tensors [L_i] int64; rewards [N];
    rollout_logprobs: optional N tensors [L_i] (the engine's sampled-token log-probs);
    routed_experts: optional N int tensors [P + L_i - 1, layers, top_k], the experts the engine routed each fed
    token to (routing replay, algo/routes.py).
    """

    group_id: int
    prompt: Tensor
    responses: List[Tensor]
    rewards: Tensor
    rollout_logprobs: Optional[List[Tensor]] = None
    routed_experts: Optional[List[Tensor]] = None

    @property
    def size(self) -> int:
        return len(self.responses)

    @property
    def num_tokens(self) -> int:
        return sum(self.prompt.numel() + r.numel() for r in self.responses)

    @property
    def max_len(self) -> int:
        return max(self.prompt.numel() + r.numel() for r in self.responses)


@dataclass
class Microbatch:
    """b sequences of whole groups padded to S tokens.

    tokens, position_ids, targets [b, S] int64; loss_inputs: mask / rewards / groups (anchor log-probs
    filled by the anchor pass); group_sizes [G]: sizes of the groups it holds;
    rollout_logprobs [b, S] aligned like targets (0 off the mask) when the engine gave them.
    """

    tokens: Tensor
    position_ids: Tensor
    targets: Tensor
    loss_inputs: LossInputs
    group_sizes: Tensor
    rollout_logprobs: Optional[Tensor] = None
    extras: dict = field(default_factory=dict)
    packed: Optional["PackedLayout"] = None  # several sequences per row (seq_packing.py); None: one per row

    @property
    def shape(self) -> tuple:
        return tuple(self.tokens.shape)

    def to(self, device) -> "Microbatch":
        """Move every tensor (tokens, targets, loss inputs, rollout log-probs) to `device` in place; returns self."""
        self.tokens = self.tokens.to(device)
        self.position_ids = self.position_ids.to(device)
        self.targets = self.targets.to(device)
        self.loss_inputs = self.loss_inputs.to(device)
        if self.rollout_logprobs is not None:
            self.rollout_logprobs = self.rollout_logprobs.to(device)
        if self.packed is not None:
            self.packed = self.packed.to(device)
        return self

    @property
    def sequence_shape(self) -> tuple:
        """[B, T]: the per-sequence layout of the loss inputs and of the log-probs the schedule returns."""
        return tuple(self.loss_inputs.mask.shape)


def padding_mask(mb: Microbatch) -> Tensor:
    """[rows, S] bool, True on padding slots of the model's input rows (packed: slots of no sequence)."""
    if mb.packed is not None:
        return mb.packed.segment_ids < 0
    lengths = mb.extras.get("seq_lengths")
    if lengths is None:
        raise ValueError("microbatch without extras['seq_lengths'] (made outside collate): its padding is unknown")
    s = mb.tokens.shape[1]
    return torch.arange(s, device=mb.tokens.device)[None, :] >= lengths.to(mb.tokens.device)[:, None]


def shard_groups(groups: Sequence[RolloutGroup], dp_size: int, dp_rank: int) -> List[RolloutGroup]:
    """Contiguous, equal share of the groups for one data-parallel rank."""
    if len(groups) % dp_size:
        raise ValueError(f"{len(groups)} prompt groups cannot be split evenly over {dp_size} data-parallel ranks")
    per = len(groups) // dp_size
    return list(groups[dp_rank * per:(dp_rank + 1) * per])


def split_by_count(groups: Sequence[RolloutGroup], num_microbatches: int) -> List[List[RolloutGroup]]:
    """num_microbatches lists with the same number of whole groups each (what pipeline schedules need)."""
    if num_microbatches < 1 or len(groups) % num_microbatches:
        raise ValueError(f"{len(groups)} groups on this rank cannot form {num_microbatches} microbatches of whole "
                         f"groups; make groups per rank a multiple of the microbatch count")
    per = len(groups) // num_microbatches
    return [list(groups[i * per:(i + 1) * per]) for i in range(num_microbatches)]


def split_by_tokens(groups: Sequence[RolloutGroup], max_tokens: int, pad_to_multiple: int = 1,
                    packed: bool = False) -> List[List[RolloutGroup]]:
    """Whole groups binned so each microbatch's cost stays within max_tokens (first-fit decreasing).

    Padded microbatches cost b * S (S: their own longest sequence, rounded up to pad_to_multiple); packed
    ones cost their real tokens (sequences share rows, see seq_packing.py). Groups are taken longest first,
    which also buckets similar lengths together; each microbatch lists its groups in their original order.
    """
    def cost(sizes: int, longest: int, tokens: int) -> int:
        return tokens if packed else sizes * _round_up(longest, pad_to_multiple)

    bins: List[list] = []  # [groups, sequences, longest, tokens]
    order = sorted(range(len(groups)), key=lambda i: (-(groups[i].num_tokens if packed else groups[i].max_len), i))
    for i in order:
        g = groups[i]
        if cost(g.size, g.max_len, g.num_tokens) > max_tokens:
            raise GroupSplitError(f"group {g.group_id} needs {g.size} x {g.max_len} tokens, more than the microbatch "
                                  f"budget of {max_tokens}; raise the budget or use the two-pass schedule")
        for b in bins:
            if cost(b[1] + g.size, max(b[2], g.max_len), b[3] + g.num_tokens) <= max_tokens:
                b[0].append(i)
                b[1], b[2], b[3] = b[1] + g.size, max(b[2], g.max_len), b[3] + g.num_tokens
                break
        else:
            bins.append([[i], g.size, g.max_len, g.num_tokens])
    return [[groups[i] for i in sorted(b[0])] for b in bins]


def round_count(parts: List[List[RolloutGroup]], multiple: int, at_least: int = 1) -> List[List[RolloutGroup]]:
    """Split the microbatches holding the most groups until there are at least `at_least` of them (expert
    parallelism: every data-parallel rank runs the same number of forward passes) and their number is a multiple
    of `multiple` (the interleaved pipeline schedule needs one); subsets of a bin stay within its budget."""
    parts = [list(p) for p in parts]
    while len(parts) % multiple or len(parts) < at_least:
        i = max(range(len(parts)), key=lambda j: len(parts[j]))
        if len(parts[i]) < 2:
            least = f", at least {at_least}" if at_least > 1 else ""
            raise ValueError(f"{sum(len(p) for p in parts)} groups cannot form a multiple of {multiple} microbatches"
                             f"{least} (interleaved pipelines need a multiple, expert parallelism the same count on "
                             f"every data-parallel rank); lower trainer.max_tokens_per_microbatch or send more "
                             f"prompts per step")
        half = len(parts[i]) // 2
        parts[i:i + 1] = [parts[i][:half], parts[i][half:]]
    return parts


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(groups: Sequence[RolloutGroup], seq_len: Optional[int] = None, pad_id: int = 0,
            pad_to_multiple: int = 8) -> Microbatch:
    """Pad whole groups into one Microbatch ([b, S]; S = seq_len or the longest, rounded up)."""
    longest = max(g.max_len for g in groups)
    s = seq_len if seq_len is not None else _round_up(longest, pad_to_multiple)
    if longest > s:
        raise ValueError(f"a sequence of {longest} tokens does not fit seq_len {s}")
    rows, masks, logps, rewards, gidx, gids = [], [], [], [], [], []
    for slot, g in enumerate(groups):
        for i, resp in enumerate(g.responses):
            seq = torch.cat([g.prompt, resp]).long()
            p, n = g.prompt.numel(), seq.numel()
            rows.append(torch.nn.functional.pad(seq, (0, s - n), value=pad_id))
            m = torch.zeros(s)
            m[p - 1:n - 1] = 1.0  # position t predicts token t+1: response tokens are predicted from p-1 .. n-2
            masks.append(m)
            lp = torch.zeros(s)
            if g.rollout_logprobs is not None:
                lp[p - 1:n - 1] = g.rollout_logprobs[i].float()
            logps.append(lp)
        rewards.append(g.rewards.double())
        gidx.append(torch.full((g.size,), slot, dtype=torch.long))
        gids.append(torch.full((g.size,), g.group_id, dtype=torch.long))
    tokens = torch.stack(rows)
    targets = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), pad_id, dtype=torch.long)], dim=1)
    mask = torch.stack(masks)
    inputs = LossInputs(mask=mask, anchor_logprobs=torch.zeros_like(mask), rewards=torch.cat(rewards).float(),
                        group_index=torch.cat(gidx), num_groups=len(groups), group_ids=torch.cat(gids))
    has_lp = all(g.rollout_logprobs is not None for g in groups)
    return Microbatch(tokens=tokens, position_ids=torch.arange(s).expand(tokens.shape[0], s).clone(),
                      targets=targets, loss_inputs=inputs,
                      group_sizes=torch.tensor([g.size for g in groups]),
                      rollout_logprobs=torch.stack(logps) if has_lp else None,
                      extras={"seq_lengths": torch.tensor([g.prompt.numel() + r.numel() for g in groups
                                                           for r in g.responses])})


def pack_microbatches(groups: Sequence[RolloutGroup], *, num_microbatches: Optional[int] = None,
                      max_tokens: Optional[int] = None, uniform_length: bool = False, pad_id: int = 0,
                      pad_to_multiple: int = 8, packed: Optional[str] = None,
                      count_multiple: int = 1, min_count: int = 1) -> List[Microbatch]:
    """One rank's groups -> microbatches of whole groups, by count or by token budget (exactly one).

    uniform_length pads every microbatch to the same S (pipeline parallelism sends fixed shapes);
    packed ("rows" or "thd", seq_packing.py) puts several sequences in one row instead of padding each;
    count_multiple: a token budget's microbatch count is made a multiple of it (interleaved pipelines);
    min_count: and at least this (the largest count of any data-parallel rank, under expert parallelism).
    """
    if (num_microbatches is None) == (max_tokens is None):
        raise ValueError("give exactly one of num_microbatches and max_tokens")
    for g in groups:
        if g.size < 1 or g.rewards.shape != (g.size,):
            raise ValueError(f"group {g.group_id} has {g.size} responses but rewards of shape {tuple(g.rewards.shape)}")
        if g.prompt.numel() == 0:
            raise ValueError(f"group {g.group_id} has an empty prompt")
        if any(r.numel() == 0 for r in g.responses):
            raise ValueError(f"group {g.group_id} has an empty response")
    if num_microbatches:
        parts = split_by_count(groups, num_microbatches)
    else:
        parts = round_count(split_by_tokens(groups, max_tokens, pad_to_multiple, packed=packed is not None),
                            count_multiple, min_count)
    seq_len = _round_up(max(g.max_len for g in groups), pad_to_multiple) if uniform_length else None
    mbs = [collate(p, seq_len if packed is None else None, pad_id, 1 if packed else pad_to_multiple) for p in parts]
    if packed is not None:
        from megatron_gift.algo.seq_packing import pack_rows
        mbs = [pack_rows(mb, packed, pad_id=pad_id, pad_to_multiple=pad_to_multiple,
                         row_len=seq_len if packed == "rows" else None) for mb in mbs]
    return mbs
