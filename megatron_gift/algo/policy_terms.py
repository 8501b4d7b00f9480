"""Token-level pieces shared by the PPO-style baselines (GRPO, DAPO, GSPO): KL estimators and loss
aggregation with exactly one division by a global count (pure torch, no host syncs).

Aggregation modes (the names of verl's `loss_agg_mode`, verl/trainer/ppo/core_algos.py `agg_loss`):
- `token-mean`           sum over every response token of the global batch / global number of tokens;
- `seq-mean-token-mean`  sum over sequences of (token mean of the sequence) / global number of sequences;
- `seq-mean-token-sum`   sum over sequences of (token sum of the sequence) / global number of sequences.
A loss returns the numerator and the count of what its mode normalises by (`LossOutput.num_sequences`,
tokens for token-mean); the schedule sums both over microbatches, data-parallel and context-parallel
ranks and divides once, so the result does not depend on the layout. verl divides per micro-batch and
rescales; the global division is what its token-mean means for a whole mini-batch.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch

from megatron_gift.algo.group_stats import sequence_sum
from megatron_gift.algo.types import SequenceReducer, Tensor

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = ("k1", "k2", "k3")

# k3's clamps, as verl's `kl_penalty` ("low_var_kl" / "k3"): the log-ratio to +-20, the estimate to +-10.
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs (Schulman, "Approximating
    KL divergence", 2020): k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) + log r - 1 (clamped),
    with log r = logp - ref."""
    log_r = logprobs - ref_logprobs.detach()
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    if estimator == "k3":
        d = torch.clamp(-log_r, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(d) - d - 1.0, -K3_VALUE_CLAMP, K3_VALUE_CLAMP)
    raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")


def aggregate(token_loss: Tensor, mask: Tensor, mode: str, weight: Tensor,
              reduce_seq: SequenceReducer) -> Tuple[Tensor, Tensor, Tensor]:
    """(numerator, count, tokens per sequence [B]) of `token_loss` [B, T] over `mask` in `mode`.

    weight [B] (0 or 1) drops sequences from numerator and count (skipped zero-variance groups).
    Sequences with no response token add 0 to the numerator; in the seq-mean modes they still count
    (verl's mean over sequences counts them too, and divides 0 by 0 there).
    """
    n_tok = reduce_seq(mask.sum(dim=-1))
    seq_sum = reduce_seq(sequence_sum(token_loss, mask))
    if mode == "token-mean":
        return (weight * seq_sum).sum(), (weight * n_tok).sum(), n_tok
    if mode == "seq-mean-token-mean":
        return (weight * seq_sum / n_tok.clamp(min=1)).sum(), weight.sum(), n_tok
    if mode == "seq-mean-token-sum":
        return (weight * seq_sum).sum(), weight.sum(), n_tok
    raise ValueError(f"loss_agg_mode must be one of {', '.join(AGG_MODES)}, got {mode!r}")


def check_agg_mode(mode: str, where: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"{where} loss_agg_mode must be one of {', '.join(AGG_MODES)}, got {mode!r}")


def check_clip(clip_low: float, clip_high: float, where: str) -> None:
    if not (0 < clip_low < 1) or not clip_high > 0:
        raise ValueError(f"{where} clip_low must be in (0, 1) and clip_high > 0, got {clip_low}, {clip_high}")


def check_kl(kl_coef: float, estimator: str, where: str) -> None:
    if kl_coef < 0:
        raise ValueError(f"{where} kl_coef must be >= 0, got {kl_coef}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"{where} kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")


def masked_total(values: Tensor, mask: Tensor, reduce_seq: SequenceReducer) -> Tensor:
    """Sum of values [B, T] over the mask and the whole sequence (CP-reduced), detached: for metrics."""
    return reduce_seq(sequence_sum(values.detach(), mask)).sum()


def kl_term(logprobs: Tensor, ref_logprobs: Optional[Tensor], kl_coef: float, estimator: str,
            where: str) -> Optional[Tensor]:
    """The per-token KL estimate, or None when kl_coef is 0; ref log-probs are required otherwise."""
    if kl_coef == 0:
        return None
    if ref_logprobs is None:
        raise ValueError(f"{where} kl_coef > 0 needs ref_logprobs in the loss inputs")
    return kl_estimate(logprobs, ref_logprobs, estimator)


class PolicyLoss:
    """What the PPO-style losses (grpo, dapo, gspo) share: anchor `old` (the rollout policy), a config of
    `config_cls` (its defaults when none is given), and the reference model only for a KL term."""

    anchor = "old"
    config_cls: type

    def __init__(self, config=None):
        self.config = config or self.config_cls()

    @property
    def needs_ref_logprobs(self) -> bool:
        return self.config.kl_coef > 0
