"""DAPO's loss (Yu et al., "DAPO: an Open-Source LLM Reinforcement Learning System at Scale",
arXiv 2503.14476): GRPO with clip-higher and the token-level loss, as a named preset.

Owns only the defaults of the verl DAPO recipe (recipe/dapo): clip range [1 - 0.2, 1 + 0.28], dual clip
at 10, `token-mean` aggregation, no KL term. The other DAPO parts live where they act: dynamic sampling
is a trainer feature (`trainer.dynamic_sampling`, trainer/dynamic_sampling.py) and overlong reward
shaping a reward term (`overlong`, rewards/overlong.py). Every GRPO option can still be set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_gift.algo.grpo import GRPOConfig, GRPOLoss


@dataclass
class DAPOConfig(GRPOConfig):
    """GRPOConfig with the DAPO recipe's defaults (clip_high 0.28, clip_ratio_c 10, token-mean, no KL)."""

    clip_high: float = 0.28
    clip_ratio_c: Optional[float] = 10.0
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0


class DAPOLoss(GRPOLoss):
    """GRPOLoss configured by DAPOConfig."""

    name = "dapo"
    config_cls = DAPOConfig
