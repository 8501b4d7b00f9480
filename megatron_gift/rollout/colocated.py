"""Colocated rollouts: every trainer rank hosts (a tensor-parallel share of) a rollout engine, whatever
the training layout.

Owns: which ranks form one engine (`rollout.engine.tensor_parallel_size` consecutive global ranks: the
tensor-parallel groups vLLM's external launcher builds over the trainer's world), which prompts of a
step's global batch each engine generates (contiguous, balanced slices), handing the scored groups to the
data-parallel replicas that train on them, and the step's rollout statistics summed over engines.

Why every rank: in-process vLLM joins the trainer's default process group and creates its own groups
collectively over the whole world, so an engine on some ranks only (say one per TP=2 replica) deadlocks
at start-up. With an engine on every rank the engines also generate in parallel: a TP=2 x PP=2 replica
of four ranks samples its prompts with four engines (or one four-way tensor-parallel engine).
This module never imports vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_gift.algo.packing import RolloutGroup
from megatron_gift.rollout.wire import decode_groups, encode_groups


def balanced_slice(total: int, parts: int, index: int) -> Tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` contiguous, near-equal parts
    (the first `total % parts` parts get one more)."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts} does not exist")
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class EnginePlacement:
    """This rank's engine: `engine_tp` consecutive global ranks share one engine (vLLM tensor parallelism).

    Every rank of an engine calls generate with the same prompts and seed (vLLM runs SPMD under the
    external launcher); the engine's first rank scores the samples and hands them on."""

    rank: int
    world_size: int
    engine_tp: int = 1

    def __post_init__(self) -> None:
        if self.engine_tp < 1 or self.world_size % self.engine_tp:
            raise ValueError(f"rollout.engine.tensor_parallel_size = {self.engine_tp} must divide the world size "
                             f"{self.world_size} (each engine spans that many consecutive ranks)")

    @property
    def num_engines(self) -> int:
        return self.world_size // self.engine_tp

    @property
    def engine_index(self) -> int:
        return self.rank // self.engine_tp

    @property
    def is_engine_leader(self) -> bool:
        return self.rank % self.engine_tp == 0

    def share(self, num_prompts: int) -> Tuple[int, int]:
        """[start, stop) of the step's global prompt batch that this rank's engine generates."""
        return balanced_slice(num_prompts, self.num_engines, self.engine_index)

    def needs_exchange(self, dp: int) -> bool:
        """False when every engine generates exactly its own replica's prompts: one-rank replicas (pure
        data parallelism) each with a one-rank engine. The same answer on every rank (it gates a collective)."""
        return not (self.engine_tp == 1 and self.world_size == dp)


def exchange_groups(local: List[RolloutGroup], wanted: Tuple[int, int], placement: EnginePlacement,
                    dp: int, device: torch.device = torch.device("cpu")) -> List[RolloutGroup]:
    """Every rank: the scored groups whose group_id lies in `wanted` (this replica's share), sorted by id.

    `local` are the groups this rank scored (engine leaders; others pass []). Collective over the world
    unless `placement.needs_exchange(dp)` is False: every rank's wanted range is gathered (two ints a rank),
    then each rank sends every other rank only the groups it wants, as one int32 tensor (rollout/wire.py)
    through all_to_all: a rank receives its replica's share, not every group of the step."""
    start, stop = wanted
    if not placement.needs_exchange(dp):
        mine = list(local)
    else:
        mine = _deliver(local, wanted, placement.world_size, device)
    mine.sort(key=lambda g: g.group_id)
    ids = [g.group_id for g in mine]
    if ids != list(range(start, stop)):
        raise RuntimeError(f"rollout exchange: expected the groups {start}..{stop - 1} of this step, got {ids}")
    return mine


def _deliver(local: List[RolloutGroup], wanted: Tuple[int, int], world: int, device) -> List[RolloutGroup]:
    """all_to_all of encoded groups: rank r receives exactly the local groups of every rank in r's range."""
    ranges = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(ranges, torch.tensor(list(wanted), dtype=torch.int64, device=device))
    bounds = torch.stack(ranges).tolist()
    send = [encode_groups([g for g in local if lo <= g.group_id < hi]) for lo, hi in bounds]
    send_counts = torch.tensor([t.numel() for t in send], dtype=torch.int64, device=device)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    recv_sizes = recv_counts.tolist()
    received = torch.empty(sum(recv_sizes), dtype=torch.int32, device=device)
    dist.all_to_all_single(received, torch.cat(send).to(device), output_split_sizes=recv_sizes,
                           input_split_sizes=send_counts.tolist())
    _RECEIVED[0] = received.numel() * received.element_size()
    return decode_groups(received.cpu())


_RECEIVED = [0]


def last_received_bytes() -> int:
    """Bytes of groups this rank received in its last exchange (for the tests and the benchmark)."""
    return _RECEIVED[0]


def sum_over_world(values: Sequence[float], device: torch.device) -> List[float]:
    """Element-wise sums of `values` over every rank (float64, one all-reduce; as given in one process)."""
    vec = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
    return vec.tolist()


@dataclass
class RolloutStats:
    """What the engines produced in one step, summed over engines: samples, response tokens, reward terms."""

    samples: float = 0.0
    tokens: float = 0.0
    term_sums: Dict[str, float] = None  # type: ignore[assignment]

    def reduced(self, term_names: Sequence[str], device: torch.device) -> "RolloutStats":
        """Sum over every rank of the world (non-leaders hold zeros); one all-reduce, the same on all ranks."""
        sums = self.term_sums or {}
        values = sum_over_world([self.samples, self.tokens] + [sums.get(k, 0.0) for k in term_names], device)
        return RolloutStats(samples=values[0], tokens=values[1], term_sums=dict(zip(term_names, values[2:])))

    def term_means(self) -> Dict[str, float]:
        return {k: v / self.samples for k, v in (self.term_sums or {}).items()} if self.samples else {}
