"""Dynamic sampling (DAPO, Yu et al. arXiv 2503.14476, sec. 3.2; verl's `algorithm.filter_groups`): drop
prompt groups whose rewards are all equal (they carry no group-relative signal) and sample more prompts
until the step's batch is full. A trainer feature any loss can use (`trainer.dynamic_sampling`).

Owns: the config, the filter, the refill loop with its cap, the gather of a round's groups to every rank,
and the metrics. Layout invariance: every round's whole global batch is gathered to every rank before
filtering, so every rank keeps the same groups in the same order; kept groups are renumbered 0..n-1 and
each data-parallel replica then takes its balanced slice, as without dynamic sampling. Round r of a step
samples its prompts as positions r * n .. r * n + n - 1 of that step's seed (round 0 is the usual batch).
Resume: the refill draws from the trainer's prompt sampler, whose position is in every checkpoint, and
keeps nothing across steps, so a run killed in the middle of a refill resumes at the step's start and
draws the same prompts and samples again. Never imports vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Tuple

import torch.distributed as dist

from megatron_gift.algo.packing import RolloutGroup
from megatron_gift.rollout.colocated import RolloutStats


@dataclass
class DynamicSamplingConfig:
    """enabled: drop zero-variance groups and refill the batch;
    max_rounds: generation rounds per step at most, the first included (verl's max_num_gen_batches: 10),
        so at most max_rounds - 1 extra rounds;
    on_cap: what happens when the cap is reached with the batch still short: `fill` tops it up with the
        dropped groups, in order (counted in `dynamic_sampling/filled`), `error` stops the run (verl)."""

    enabled: bool = False
    max_rounds: int = 10
    on_cap: str = "fill"

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"trainer.dynamic_sampling.enabled must be true or false, got {self.enabled!r}")
        if not isinstance(self.max_rounds, int) or isinstance(self.max_rounds, bool) or self.max_rounds < 1:
            raise ValueError(f"trainer.dynamic_sampling.max_rounds must be an int >= 1, got {self.max_rounds!r}")
        if self.on_cap not in ("fill", "error"):
            raise ValueError(f"trainer.dynamic_sampling.on_cap must be 'fill' or 'error', got {self.on_cap!r}")


class DynamicSamplingCapError(RuntimeError):
    """The cap on generation rounds was reached before the batch was full (on_cap: error)."""


def has_reward_variance(group: RolloutGroup) -> bool:
    """True when the group's rewards are not all equal (a group of one never has variance)."""
    return group.size > 1 and bool(group.rewards.max() != group.rewards.min())


def collect_groups(next_round: Callable[[int], List[RolloutGroup]], target: int,
                   cfg: DynamicSamplingConfig) -> Tuple[List[RolloutGroup], Dict[str, float]]:
    """Run rounds (`next_round(r)`: that round's whole global batch, the same on every rank) until `target`
    groups with reward variance are kept or `cfg.max_rounds` rounds ran; the batch, renumbered 0..target-1,
    and the metrics (rounds, kept fraction of generated groups, groups filled in at the cap)."""
    kept: List[RolloutGroup] = []
    dropped: List[RolloutGroup] = []
    rounds = generated = 0
    while len(kept) < target and rounds < cfg.max_rounds:
        groups = next_round(rounds)
        rounds += 1
        generated += len(groups)
        for g in groups:
            (kept if has_reward_variance(g) else dropped).append(g)
    with_variance = len(kept)
    filled = 0
    if len(kept) < target:
        if cfg.on_cap == "error":
            raise DynamicSamplingCapError(
                f"dynamic sampling: {len(kept)} of {target} groups with reward variance after "
                f"trainer.dynamic_sampling.max_rounds={cfg.max_rounds} rounds ({generated} groups generated); the "
                f"prompts may be too easy or too hard for the policy; raise max_rounds or set on_cap: fill")
        filled = min(target - len(kept), len(dropped))
        kept += dropped[:filled]
    if len(kept) < target:
        raise DynamicSamplingCapError(f"dynamic sampling: only {len(kept)} groups for a batch of {target}")
    batch = [replace(g, group_id=i) for i, g in enumerate(kept[:target])]
    metrics = {"dynamic_sampling/rounds": float(rounds),
               "dynamic_sampling/kept_frac": with_variance / max(generated, 1),
               "dynamic_sampling/filled": float(filled)}
    return batch, metrics


def gather_round(local: List[RolloutGroup], num_prompts: int) -> List[RolloutGroup]:
    """Every rank: all `num_prompts` scored groups of a round, sorted by group id (one all_gather_object
    over the world; `local` are the groups this rank's engine scored, [] on non-leaders)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: List[List[RolloutGroup]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, list(local))
        groups = [g for part in gathered for g in part]
    else:
        groups = list(local)
    groups.sort(key=lambda g: g.group_id)
    if [g.group_id for g in groups] != list(range(num_prompts)):
        raise RuntimeError(f"dynamic sampling: expected the groups 0..{num_prompts - 1} of the round, "
                           f"got {[g.group_id for g in groups]}")
    return groups


def add_stats(a: RolloutStats, b: RolloutStats) -> RolloutStats:
    """Rollout statistics of two rounds together."""
    terms = dict(a.term_sums or {})
    for k, v in (b.term_sums or {}).items():
        terms[k] = terms.get(k, 0.0) + v
    return RolloutStats(samples=a.samples + b.samples, tokens=a.tokens + b.tokens, term_sums=terms)


def dynamic_rollout(trainer, cfg: DynamicSamplingConfig,
                    num_prompts: int) -> Tuple[List[RolloutGroup], RolloutStats, Dict[str, float]]:
    """The trainer's rollout phase with dynamic sampling: this replica's share of the refilled batch, the
    rollout statistics summed over rounds, and the metrics. `trainer` provides sampler.next_batch(n),
    generate_and_score(batch, round_index, gather_all) -> (groups, stats) and replica_share(n)."""
    total = RolloutStats(term_sums={})

    def next_round(r: int) -> List[RolloutGroup]:
        nonlocal total
        groups, stats = trainer.generate_and_score(trainer.sampler.next_batch(num_prompts), round_index=r,
                                                   gather_all=True)
        total = add_stats(total, stats)
        return groups

    batch, metrics = collect_groups(next_round, num_prompts, cfg)
    start, stop = trainer.replica_share(num_prompts)
    return batch[start:stop], total, metrics
