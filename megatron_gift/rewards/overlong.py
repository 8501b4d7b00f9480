"""DAPO's overlong reward shaping (Yu et al., arXiv 2503.14476, eq. 13; verl's DAPO reward manager): a
soft length penalty over the last `buffer_tokens` tokens before the response length limit.

With L_max = max_response_tokens, L_cache = buffer_tokens and |y| the response length in tokens:
    R_length(y) = 0                                    if |y| <= L_max - L_cache
                = -(|y| - (L_max - L_cache)) / L_cache * penalty_factor   otherwise (-penalty_factor at L_max)
so it is added as a reward term (`{name: overlong, kwargs: {max_response_tokens, buffer_tokens}}`). The
length comes from each response's metadata key `response_tokens`, which the trainer and the evaluation
tool fill from the engine's token ids (CombinedReward.score_records(..., response_lengths=...)).
"""
from __future__ import annotations

from typing import Any

from megatron_gift.rewards.base import RewardError, check_inputs, describe_prompt

LENGTH_KEY = "response_tokens"


class OverlongPenalty:
    """fn(prompts, responses, metadata) -> [R_length] from metadata[i]['response_tokens']."""

    def __init__(self, max_response_tokens: int, buffer_tokens: int, penalty_factor: float = 1.0) -> None:
        for key, value in (("max_response_tokens", max_response_tokens), ("buffer_tokens", buffer_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"overlong reward: '{key}' must be an int >= 1, got {value!r}")
        if buffer_tokens > max_response_tokens:
            raise ValueError(f"overlong reward: 'buffer_tokens' ({buffer_tokens}) exceeds 'max_response_tokens' "
                             f"({max_response_tokens})")
        if isinstance(penalty_factor, bool) or not isinstance(penalty_factor, (int, float)) or penalty_factor < 0:
            raise ValueError(f"overlong reward: 'penalty_factor' must be a number >= 0, got {penalty_factor!r}")
        self.max_tokens, self.buffer, self.factor = max_response_tokens, buffer_tokens, float(penalty_factor)

    def penalty(self, length: int) -> float:
        exceed = length - (self.max_tokens - self.buffer)
        return min(-exceed / self.buffer * self.factor, 0.0)

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        check_inputs(prompts, responses, metadata)
        out = []
        for i, meta in enumerate(metadata):
            if not isinstance(meta, dict) or LENGTH_KEY not in meta:
                raise RewardError(f"reward 'overlong' needs metadata key '{LENGTH_KEY}' (the response length in "
                                  f"tokens) for {describe_prompt(i, prompts, metadata)}; the trainer and the "
                                  f"evaluation tool set it, a direct call must pass it")
            out.append(self.penalty(int(meta[LENGTH_KEY])))
        return out


def build_overlong(**kwargs: Any) -> OverlongPenalty:
    return OverlongPenalty(**kwargs)
