"""GRPO baseline loss as verl runs it, with the same interface as GIFT, for A/B runs.

Owns: group-normalised advantages A_i = (R_i - mean_g R) / (std_g R + eps) broadcast to tokens (Shao et
al., DeepSeekMath, eq. 3-4; verl `compute_grpo_outcome_advantage`), the PPO-clipped token surrogate
against the rollout ("old") log-probs with verl's refinements (`compute_policy_loss_vanilla`):
    log r = clamp(logp - logp_old, -20, 20),  r = exp(log r)
    l     = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))        (clip-low / clip-high)
    l     = min(l, -A clip_ratio_c)  where A < 0                        (dual clip, Ye et al. 2019)
plus an optional KL penalty to the reference (k1 / k2 / k3, verl `kl_penalty`), aggregated by
`loss_agg_mode` (policy_terms.py) with one division by the global count of tokens or sequences.

Default aggregation is `token-mean`, verl's default (the DAPO paper's token-level loss); the first
GIFT-vs-GRPO study in the README used `seq-mean-token-mean` (the DeepSeekMath formula). Pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_gift.algo.group_stats import group_advantages, zero_variance_groups
from megatron_gift.algo.policy_terms import (PolicyLoss, aggregate, check_agg_mode, check_clip, check_kl, kl_term,
                                             masked_total)
from megatron_gift.algo.types import LossInputs, LossOutput, SequenceReducer, Tensor, identity_reducer, metric


@dataclass
class GRPOConfig:
    """GRPO hyper-parameters (verl's names in brackets).

    clip_low / clip_high: ratio clip range [1 - clip_low, 1 + clip_high] (clip_ratio_low / _high);
    clip_ratio_c: dual-clip bound for negative advantages, > 1 (clip_ratio_c, 3.0); null turns it off;
    log_ratio_clamp: |logp - logp_old| is clamped to this before exp (verl: 20);
    loss_agg_mode: token-mean (verl's default) | seq-mean-token-mean | seq-mean-token-sum;
    kl_coef, kl_estimator: KL penalty to the reference model, k1 / k2 / k3 (kl_loss_coef, kl_loss_type;
        verl's low_var_kl is k3, with its clamps);
    eps: added to the reward std; scale_advantages_by_std: false gives Dr. GRPO's A = R - mean
        (norm_adv_by_std_in_grpo);
    skip_zero_variance_groups: drop groups whose rewards are all equal from the loss and the count.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0
    log_ratio_clamp: float = 20.0
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    eps: float = 1e-6
    scale_advantages_by_std: bool = True
    skip_zero_variance_groups: bool = False

    def __post_init__(self) -> None:
        where = type(self).__name__.replace("Config", "").lower()
        check_clip(self.clip_low, self.clip_high, where)
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"{where} clip_ratio_c must be > 1 (or null: no dual clip), got {self.clip_ratio_c}")
        if not self.log_ratio_clamp > 0:
            raise ValueError(f"{where} log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")
        check_agg_mode(self.loss_agg_mode, where)
        check_kl(self.kl_coef, self.kl_estimator, where)


def sequence_advantages(inputs: LossInputs, dtype: torch.dtype, eps: float, scale_by_std: bool = True) -> Tensor:
    """A [B]: group-normalised rewards (singleton groups: mean 0, std 1, as verl); no gradient."""
    z = group_advantages(inputs.rewards.to(dtype), inputs.group_index, inputs.num_groups, eps)
    if scale_by_std:
        return z.z
    mean = torch.where(z.counts > 1, z.mean, torch.zeros_like(z.mean))
    return inputs.rewards.to(dtype) - mean[inputs.group_index]


def sequence_weights(inputs: LossInputs, like: Tensor, skip_zero_variance: bool) -> Tensor:
    """[B] 1 for sequences that count, 0 for members of skipped zero-variance groups."""
    if not skip_zero_variance:
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    zero_var = zero_variance_groups(inputs.rewards, inputs.group_index, inputs.num_groups)
    return (~zero_var[inputs.group_index]).to(like.dtype)


class GRPOLoss(PolicyLoss):
    """GRPO loss of one microbatch: `loss(logprobs [B, T], inputs) -> LossOutput`.

    inputs.anchor_logprobs are the rollout policy's log-probs (the PPO "old" policy);
    inputs.ref_logprobs are needed when kl_coef > 0.
    """

    name = "grpo"
    config_cls = GRPOConfig

    def __call__(self, logprobs: Tensor, inputs: LossInputs,
                 reduce_seq: SequenceReducer = identity_reducer) -> LossOutput:
        cfg = self.config
        mask = inputs.mask.to(logprobs.dtype)
        adv = sequence_advantages(inputs, logprobs.dtype, cfg.eps, cfg.scale_advantages_by_std)[:, None]
        log_ratio = torch.clamp(logprobs - inputs.anchor_logprobs.detach(), -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
        token_loss = torch.maximum(unclipped, clipped)
        lower = torch.zeros_like(mask)
        if cfg.clip_ratio_c is not None:
            bound = -adv * cfg.clip_ratio_c
            lower = ((token_loss > bound) & (adv < 0)).to(mask.dtype)
            token_loss = torch.where(adv < 0, torch.minimum(token_loss, bound), token_loss)
        kl = kl_term(logprobs, inputs.ref_logprobs, cfg.kl_coef, cfg.kl_estimator, self.name)
        if kl is not None:
            token_loss = token_loss + cfg.kl_coef * kl
        weight = sequence_weights(inputs, logprobs, cfg.skip_zero_variance_groups)
        loss_sum, count, n_tok = aggregate(token_loss, mask, cfg.loss_agg_mode, weight, reduce_seq)
        tokens = n_tok.sum()
        metrics = {
            "loss": metric(loss_sum, count),
            "clip_frac": metric(masked_total((clipped > unclipped).to(mask.dtype), mask, reduce_seq), tokens),
            "clip_frac_lower": metric(masked_total(lower, mask, reduce_seq), tokens),
            "ppo_kl": metric(masked_total(-log_ratio, mask, reduce_seq), tokens),
            "log_ratio_mean": metric(masked_total(log_ratio, mask, reduce_seq), logprobs.shape[0]),
        }
        if kl is not None:
            metrics["kl"] = metric(masked_total(kl, mask, reduce_seq), tokens)
        return LossOutput(loss_sum=loss_sum, num_sequences=count.detach(), metrics=metrics)
