"""GRPO baseline loss with the same interface as GIFT, for A/B runs.

Owns: group-normalised advantages A_i = (R_i - mean_g R) / (std_g R + eps) broadcast to tokens, the
PPO-clipped token surrogate against the rollout ("old") log-probs, and an optional k3 KL penalty to
the reference policy (Shao et al., DeepSeekMath, eq. 3-4). Per-sequence token means are summed over
sequences ("seq-mean-token-mean"), so the schedule divides once by the global number of sequences,
exactly as for GIFT. Pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_gift.algo.group_stats import group_advantages, sequence_sum, zero_variance_groups
from megatron_gift.algo.types import LossInputs, LossOutput, SequenceReducer, Tensor, identity_reducer, metric


@dataclass
class GRPOConfig:
    """GRPO hyper-parameters: clip range [1 - clip_low, 1 + clip_high], KL weight, std eps."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    eps: float = 1e-6
    skip_zero_variance_groups: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.clip_low < 1) or not self.clip_high > 0:
            raise ValueError(f"grpo clip_low must be in (0, 1) and clip_high > 0, got {self.clip_low}, {self.clip_high}")
        if self.kl_coef < 0:
            raise ValueError(f"grpo kl_coef must be >= 0, got {self.kl_coef}")


class GRPOLoss:
    """GRPO loss of one microbatch: `loss(logprobs [B, T], inputs) -> LossOutput`.

    inputs.anchor_logprobs are the rollout policy's log-probs (the PPO "old" policy);
    inputs.ref_logprobs are needed when kl_coef > 0.
    """

    name = "grpo"
    anchor = "old"

    def __init__(self, config: GRPOConfig | None = None):
        self.config = config or GRPOConfig()

    @property
    def needs_ref_logprobs(self) -> bool:
        return self.config.kl_coef > 0

    def __call__(self, logprobs: Tensor, inputs: LossInputs,
                 reduce_seq: SequenceReducer = identity_reducer) -> LossOutput:
        cfg = self.config
        mask = inputs.mask.to(logprobs.dtype)
        adv = group_advantages(inputs.rewards.to(logprobs.dtype), inputs.group_index, inputs.num_groups, cfg.eps).z
        log_ratio = logprobs - inputs.anchor_logprobs.detach()
        ratio = torch.exp(log_ratio)
        a_tok = adv[:, None]
        clipped = torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
        token_loss = -torch.minimum(ratio * a_tok, clipped * a_tok)
        kl = self._kl(logprobs, inputs)
        if kl is not None:
            token_loss = token_loss + cfg.kl_coef * kl
        n_tok = reduce_seq(mask.sum(dim=-1)).clamp(min=1)
        seq_loss = reduce_seq(sequence_sum(token_loss, mask)) / n_tok
        weight = torch.ones_like(seq_loss.detach())
        if cfg.skip_zero_variance_groups:
            zero_var = zero_variance_groups(inputs.rewards, inputs.group_index, inputs.num_groups)
            weight = (~zero_var[inputs.group_index]).to(seq_loss.dtype)
        loss_sum = (weight * seq_loss).sum()
        count = weight.sum()
        was_clipped = ((ratio * a_tok) > (clipped * a_tok)).to(mask.dtype)
        metrics = {
            "loss": metric(loss_sum, count),
            "clip_frac": metric(reduce_seq(sequence_sum(was_clipped.detach(), mask)).sum(), n_tok.sum()),
            "log_ratio_mean": metric(reduce_seq(sequence_sum(log_ratio.detach(), mask)).sum(), logprobs.shape[0]),
        }
        if kl is not None:
            metrics["kl"] = metric(reduce_seq(sequence_sum(kl.detach(), mask)).sum(), n_tok.sum())
        return LossOutput(loss_sum=loss_sum, num_sequences=count.detach(), metrics=metrics)

    def _kl(self, logprobs: Tensor, inputs: LossInputs) -> Tensor | None:
        """k3 estimator exp(ref - logp) - (ref - logp) - 1 per token (Schulman), or None without a KL term."""
        if self.config.kl_coef == 0:
            return None
        if inputs.ref_logprobs is None:
            raise ValueError("grpo kl_coef > 0 needs ref_logprobs in the loss inputs")
        delta = inputs.ref_logprobs.detach() - logprobs
        return torch.exp(delta) - delta - 1.0
