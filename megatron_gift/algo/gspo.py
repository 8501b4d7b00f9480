"""GSPO (Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071): the importance ratio and
its clipping are per sequence, not per token.

Owns the loss of one microbatch. With s_i = exp((1/|y_i|) sum_t (logp_it - logp_old_it)) (the
length-normalised sequence ratio) and the group-normalised advantage A_i (grpo.py), the objective is
    L = (1 / N_total) sum_i max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high)).
As in verl (`compute_policy_loss_gspo`), the ratio is written per token as
    s_it = sg(s_i) * exp(logp_it - sg(logp_it)),   log s_it clamped above at 10,
whose value is s_i and whose gradient, averaged over the tokens of the sequence (seq-mean-token-mean,
the only aggregation GSPO defines), is the gradient of s_i itself. Defaults are the paper's clip range
(3e-4, 4e-4). Pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_gift.algo.grpo import sequence_advantages, sequence_weights
from megatron_gift.algo.group_stats import sequence_sum
from megatron_gift.algo.policy_terms import PolicyLoss, aggregate, check_clip, check_kl, kl_term, masked_total
from megatron_gift.algo.types import LossInputs, LossOutput, SequenceReducer, Tensor, identity_reducer, metric

# verl clamps the token-level log-ratio of GSPO above at 10 before exp.
GSPO_LOG_RATIO_MAX = 10.0


@dataclass
class GSPOConfig:
    """GSPO hyper-parameters: sequence-ratio clip range [1 - clip_low, 1 + clip_high] (paper: 3e-4, 4e-4);
    kl_coef / kl_estimator: optional KL penalty to the reference (k1 / k2 / k3), token-averaged per
    sequence; eps: added to the reward std; skip_zero_variance_groups as for GRPO."""

    clip_low: float = 3e-4
    clip_high: float = 4e-4
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    eps: float = 1e-6
    scale_advantages_by_std: bool = True
    skip_zero_variance_groups: bool = False

    def __post_init__(self) -> None:
        check_clip(self.clip_low, self.clip_high, "gspo")
        check_kl(self.kl_coef, self.kl_estimator, "gspo")


class GSPOLoss(PolicyLoss):
    """GSPO loss of one microbatch: `loss(logprobs [B, T], inputs) -> LossOutput` (anchor: the rollout policy)."""

    name = "gspo"
    config_cls = GSPOConfig

    def __call__(self, logprobs: Tensor, inputs: LossInputs,
                 reduce_seq: SequenceReducer = identity_reducer) -> LossOutput:
        cfg = self.config
        mask = inputs.mask.to(logprobs.dtype)
        adv = sequence_advantages(inputs, logprobs.dtype, cfg.eps, cfg.scale_advantages_by_std)[:, None]
        log_ratio = logprobs - inputs.anchor_logprobs.detach()
        n_tok = reduce_seq(mask.sum(dim=-1))
        seq_log_ratio = reduce_seq(sequence_sum(log_ratio, mask)) / n_tok.clamp(min=1)  # [B]
        log_s = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()
        s = torch.exp(torch.clamp(log_s, max=GSPO_LOG_RATIO_MAX))
        unclipped = -adv * s
        clipped = -adv * torch.clamp(s, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
        token_loss = torch.maximum(unclipped, clipped)
        kl = kl_term(logprobs, inputs.ref_logprobs, cfg.kl_coef, cfg.kl_estimator, self.name)
        if kl is not None:
            token_loss = token_loss + cfg.kl_coef * kl
        weight = sequence_weights(inputs, logprobs, cfg.skip_zero_variance_groups)
        loss_sum, count, _ = aggregate(token_loss, mask, "seq-mean-token-mean", weight, reduce_seq)
        seq_clipped = (clipped > unclipped)[:, 0] if mask.shape[1] else torch.zeros_like(n_tok, dtype=torch.bool)
        metrics = {
            "loss": metric(loss_sum, count),
            "clip_frac": metric(seq_clipped.to(mask.dtype).sum(), logprobs.shape[0]),
            "seq_log_ratio_mean": metric(seq_log_ratio.detach().sum(), logprobs.shape[0]),
            "ppo_kl": metric(masked_total(-log_ratio, mask, reduce_seq), n_tok.sum()),
        }
        if kl is not None:
            metrics["kl"] = metric(masked_total(kl, mask, reduce_seq), n_tok.sum())
        return LossOutput(loss_sum=loss_sum, num_sequences=count.detach(), metrics=metrics)
