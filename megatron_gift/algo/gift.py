"""The GIFT loss (docs/algorithm.md): MSE between group-normalised explicit and implicit rewards.

Owns the loss of one microbatch of whole groups, its metrics, and the analytic per-sequence
coefficients c_j = dL/dh_j used by the two-pass schedule. Pure torch: no megatron, no vllm.

For a group g of N responses (Wang, GIFT, arXiv 2510.23868):
    h_i = sum_t mask_it * (log pi_theta(y_it) - log pi_anchor(y_it))      (sequence log-ratio, a sum)
    A_i = (R_i - mean_g R) / (std_g R + eps)                               (no gradient)
    z_i = (h_i - mean_g h) / (std_g h + eps)
    L   = (1 / N_total) * sum over all sequences of the global batch of (A_i - beta * z_i)^2
This module returns the numerator sum and the count; the schedule divides once by the global count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_gift.algo.group_stats import (
    group_advantages,
    group_sum,
    group_zscore,
    sequence_sum,
    zero_variance_groups,
)
from megatron_gift.algo.types import LossInputs, LossOutput, SequenceReducer, Tensor, identity_reducer, metric

GradMode = Literal["detached", "full"]


@dataclass
class GIFTConfig:
    """GIFT hyper-parameters.

    beta: weight of the implicit z-score (1.0 in the released recipe).
    eps: added to the group std (not the variance).
    grad_mode: `detached` (verl implementation: group statistics of h are constants) or `full`
        (the paper's analytic formulation: statistics are differentiated).
    anchor: `ref` (frozen reference model, the paper) or `old` (rollout policy, the verl PR); the
        trainer reads it to decide which anchor log-probs to compute, the loss only consumes them.
    skip_zero_variance_groups: drop groups whose rewards are all equal from the loss and the count.
    tiny_std_threshold: groups with std_g(h) below it are counted in the `tiny_implicit_std_frac` metric.
    singleton_implicit: a group of one response; `released` (default, the released verl PR): implicit mean
        h (detached) and std 1, so z = h - sg(h) is 0 in value with gradient 1 and the loss is A^2 = R^2;
        `zero_mean` (this project before, GIFT_SPEC's explicit-side rule): mean 0, std 1, z = h.
    """

    beta: float = 1.0
    eps: float = 1e-6
    grad_mode: GradMode = "detached"
    anchor: Literal["ref", "old"] = "ref"
    skip_zero_variance_groups: bool = False
    tiny_std_threshold: float = 1e-4
    singleton_implicit: Literal["released", "zero_mean"] = "released"

    def __post_init__(self) -> None:
        if self.singleton_implicit not in ("released", "zero_mean"):
            raise ValueError(f"gift singleton_implicit must be 'released' or 'zero_mean', got {self.singleton_implicit!r}")
        if self.grad_mode not in ("detached", "full"):
            raise ValueError(f"gift grad_mode must be 'detached' or 'full', got {self.grad_mode!r}")
        if self.anchor not in ("ref", "old"):
            raise ValueError(f"gift anchor must be 'ref' or 'old', got {self.anchor!r}")
        if not self.beta > 0:
            raise ValueError(f"gift beta must be > 0, got {self.beta}")
        if not self.eps > 0:
            raise ValueError(f"gift eps must be > 0, got {self.eps}")


@dataclass
class _GroupTerms:
    """Intermediate per-sequence / per-group quantities shared by the loss and the coefficients."""

    advantages: Tensor  # [B]
    z: Tensor  # [B]
    std_h: Tensor  # [G]
    counts: Tensor  # [G]
    weight: Tensor  # [B] 1 for sequences that count, 0 for skipped zero-variance groups
    zero_var: Tensor  # [G] bool


class GIFTLoss:
    """GIFT loss of one microbatch of whole groups: `loss(logprobs [B, T], inputs) -> LossOutput`."""

    name = "gift"
    needs_ref_logprobs = False

    def __init__(self, config: GIFTConfig | None = None):
        self.config = config or GIFTConfig()

    @property
    def anchor(self) -> str:
        return self.config.anchor

    def sequence_log_ratios(self, logprobs: Tensor, inputs: LossInputs,
                            reduce_seq: SequenceReducer = identity_reducer) -> Tensor:
        """h [B]: masked sum of policy minus anchor token log-probs, reduced over context-parallel ranks."""
        return reduce_seq(sequence_sum(logprobs - inputs.anchor_logprobs.detach(), inputs.mask))

    def __call__(self, logprobs: Tensor, inputs: LossInputs,
                 reduce_seq: SequenceReducer = identity_reducer) -> LossOutput:
        return self.from_log_ratios(self.sequence_log_ratios(logprobs, inputs, reduce_seq), inputs)

    def _terms(self, h: Tensor, inputs: LossInputs) -> _GroupTerms:
        cfg = self.config
        adv = group_advantages(inputs.rewards.to(h.dtype), inputs.group_index, inputs.num_groups, cfg.eps)
        imp = group_zscore(h, inputs.group_index, inputs.num_groups, cfg.eps, detach_stats=cfg.grad_mode == "detached",
                           singleton_self_mean=cfg.singleton_implicit == "released")
        zero_var = zero_variance_groups(inputs.rewards, inputs.group_index, inputs.num_groups)
        weight = torch.ones_like(h.detach())
        if cfg.skip_zero_variance_groups:
            weight = (~zero_var[inputs.group_index]).to(h.dtype)
        return _GroupTerms(adv.z, imp.z, imp.std, imp.counts, weight, zero_var)

    def from_log_ratios(self, h: Tensor, inputs: LossInputs) -> LossOutput:
        """Loss numerator and count from the sequence log-ratios h [B]."""
        t = self._terms(h, inputs)
        residual = t.advantages - self.config.beta * t.z
        loss_sum = (t.weight * residual * residual).sum()
        count = t.weight.sum()
        return LossOutput(loss_sum=loss_sum, num_sequences=count.detach(),
                          metrics=self._metrics(h, inputs, t, residual, loss_sum, count))

    def _metrics(self, h, inputs, t: _GroupTerms, residual, loss_sum, count) -> dict:
        multi = (t.counts > 1).to(h.dtype)
        n_multi = multi.sum()
        tiny = ((t.std_h.detach() < self.config.tiny_std_threshold).to(h.dtype) * multi).sum()
        # Within-group sample correlation of A and z (both standardised with the unbiased std).
        rho_g = group_sum((t.advantages * t.z).detach(), inputs.group_index, inputs.num_groups)
        rho_g = rho_g / (t.counts - 1).clamp(min=1)
        return {
            "loss": metric(loss_sum, count),
            "abs_residual": metric((t.weight * residual.abs()).sum(), count),
            "log_ratio_mean": metric(h.sum(), h.shape[0]),
            "rho": metric((rho_g * multi).sum(), n_multi),
            "tiny_implicit_std_frac": metric(tiny, n_multi),
            "zero_reward_std_frac": metric(t.zero_var.to(h.dtype).sum(), inputs.num_groups),
        }

    def coefficients(self, h: Tensor, inputs: LossInputs, num_total: Tensor | float) -> Tensor:
        """Analytic c_j = dL/dh_j [B] for the loss normalised by num_total (the global count).

        detached: c_j = -(2 beta / (N_total (s + eps))) * (A_j - beta z_j)
        full:     c_j = (g_j - mean_g(g) - z_j (s + eps) / ((N - 1) s) * sum_g(g z)) / (s + eps),
                  with g_i = -(2 beta / N_total) (A_i - beta z_i); for eps -> 0 this is
                  -(2 beta / (N_total s)) (A_j - rho z_j) (docs/algorithm.md).
        Singleton groups (std 1, mean 0 or the detached h by convention) have no statistics to differentiate.
        """
        h = h.detach()
        t = self._terms(h, inputs)
        beta, eps = self.config.beta, self.config.eps
        g = -(2.0 * beta / num_total) * (t.advantages - beta * t.z) * t.weight
        idx, n_g = inputs.group_index, inputs.num_groups
        denom = (t.std_h + eps)[idx]
        if self.config.grad_mode == "detached":
            return g / denom
        multi = (t.counts > 1)[idx]
        g_mean = group_sum(g, idx, n_g) / t.counts
        gz = group_sum(g * t.z, idx, n_g)
        s = t.std_h
        scale = torch.where(s > 0, (s + eps) / ((t.counts - 1).clamp(min=1) * torch.where(s > 0, s, torch.ones_like(s))),
                            torch.zeros_like(s))
        full = (g - g_mean[idx] - t.z * scale[idx] * gz[idx]) / denom
        return torch.where(multi, full, g / denom)
