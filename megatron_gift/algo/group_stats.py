"""Vectorised per-group statistics for grouped rollouts (pure torch, no host syncs).

Owns: sequence sums of token values, group means / unbiased standard deviations and z-scores, with
the conventions of docs/algorithm.md (eps added to the std, groups of one response use std 1 and mean 0,
or on GIFT's implicit side their own detached value).
Groups are addressed by a dense slot index [B] in 0..G-1 and a host int G, so every reduction is an
index_add with a known output size: no Python loop over sequences and no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def sequence_sum(token_values: Tensor, mask: Tensor) -> Tensor:
    """Sum of token_values [B, T] over tokens where mask [B, T] is set -> [B] (a sum, never a mean)."""
    if token_values.shape != mask.shape:
        raise ValueError(f"token values {tuple(token_values.shape)} and mask {tuple(mask.shape)} differ in shape")
    return (token_values * mask.to(token_values.dtype)).sum(dim=-1)


def group_sum(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Sum of values [B] per group slot -> [G]."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, group_index, values)


def group_counts(group_index: Tensor, num_groups: int, dtype: torch.dtype) -> Tensor:
    """Number of sequences per group slot -> [G] (float, so it divides without casts)."""
    ones = torch.ones(group_index.shape[0], dtype=dtype, device=group_index.device)
    return group_sum(ones, group_index, num_groups)


def _safe_sqrt(var: Tensor) -> Tensor:
    """sqrt with a zero (not infinite) gradient at 0, so `full` mode stays finite on constant groups."""
    positive = var > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))


@dataclass
class GroupZ:
    """z-scores of one quantity inside its groups.

    z [B]: (x - mean_g) / (std_g + eps); mean [G], std [G]: the group statistics (std unbiased, N-1);
    counts [G]: group sizes.
    """

    z: Tensor
    mean: Tensor
    std: Tensor
    counts: Tensor


def group_zscore(x: Tensor, group_index: Tensor, num_groups: int, eps: float, detach_stats: bool,
                 singleton_self_mean: bool = False) -> GroupZ:
    """z-score x [B] inside its groups (docs/algorithm.md: unbiased std, eps on the std; singletons: std 1 and
    mean 0, or with singleton_self_mean the detached value itself, so z = (x - sg(x)) / (1 + eps) is 0 in
    value with gradient 1 / (1 + eps), as the released GIFT code does for the implicit side).

    detach_stats=True treats mean and std as constants (the `detached` gradient mode).
    """
    counts = group_counts(group_index, num_groups, x.dtype)
    singleton = counts <= 1
    mean = group_sum(x, group_index, num_groups) / counts.clamp(min=1)
    single_mean = group_sum(x.detach(), group_index, num_groups) if singleton_self_mean else torch.zeros_like(mean)
    mean = torch.where(singleton, single_mean, mean)
    centred = x - mean[group_index]
    var = group_sum(centred * centred, group_index, num_groups) / (counts - 1).clamp(min=1)
    std = torch.where(singleton, torch.ones_like(var), _safe_sqrt(var))
    if detach_stats:
        mean, std = mean.detach(), std.detach()
        centred = x - mean[group_index]
    z = centred / (std[group_index] + eps)
    return GroupZ(z=z, mean=mean, std=std, counts=counts)


def group_advantages(rewards: Tensor, group_index: Tensor, num_groups: int, eps: float) -> GroupZ:
    """Explicit advantages A = (R - mean_g R) / (std_g R + eps), without gradient."""
    return group_zscore(rewards.detach(), group_index, num_groups, eps, detach_stats=True)


def zero_variance_groups(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """[G] bool: groups with more than one member whose values are all exactly equal (max == min)."""
    fill_hi = torch.full((num_groups,), float("-inf"), dtype=values.dtype, device=values.device)
    fill_lo = torch.full((num_groups,), float("inf"), dtype=values.dtype, device=values.device)
    hi = fill_hi.scatter_reduce(0, group_index, values, reduce="amax")
    lo = fill_lo.scatter_reduce(0, group_index, values, reduce="amin")
    counts = group_counts(group_index, num_groups, values.dtype)
    return (hi == lo) & (counts > 1)
