"""Weighted combination of reward functions (L1): the object the trainer calls to score a batch.

Owns the reward config (`RewardConfig`: terms of {name, weight, kwargs} plus `nonfinite_penalty`), building
every term once, checking each term's output (rewards/base.py), and the weighted sum with per-term values
and replacement counts kept for logging.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from megatron_gift.rewards.base import RewardFn, check_inputs, check_rewards
from megatron_gift.rewards.registry import build_reward
from megatron_gift.utils.dataclass_dict import from_dict


@dataclass
class RewardTermConfig:
    """One term: reward `name` (registry name or 'package.module:function'), its weight and kwargs.
    `label` names the term in logs and errors (default: the name; required to repeat a name)."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"reward term: 'name' must be a non-empty string, got {self.name!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or self.weight != self.weight:
            raise ValueError(f"reward term '{self.name}': 'weight' must be a number, got {self.weight!r}")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"reward term '{self.name}': 'kwargs' must be a mapping, got {self.kwargs!r}")
        self.label = self.label or self.name


@dataclass
class RewardConfig:
    """The rewards of a run. nonfinite_penalty: replace a missing / non-finite term value by this number
    (counted per term) instead of stopping with an error."""

    terms: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig("math_verify")])
    nonfinite_penalty: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("reward config: 'terms' is empty; name at least one reward")
        self.terms = [t if isinstance(t, RewardTermConfig) else from_dict(RewardTermConfig, t, "reward term")
                      for t in self.terms]
        labels = [t.label for t in self.terms]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"reward config: term '{repeated[0]}' appears twice; give each a distinct 'label'")
        penalty = self.nonfinite_penalty
        if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float))
                                    or penalty != penalty or abs(penalty) == float("inf")):
            raise ValueError(f"reward config: 'nonfinite_penalty' must be a finite number or null, got {penalty!r}")


def reward_config_from_dict(data: Mapping[str, Any]) -> RewardConfig:
    """Build a RewardConfig; unknown keys (also inside terms) are errors naming the nearest valid key."""
    data = dict(data)
    terms = [from_dict(RewardTermConfig, t, where=f"reward term {i}") for i, t in enumerate(data.pop("terms", []))]
    return from_dict(RewardConfig, {**data, **({"terms": terms} if terms else {})}, where="reward config")


@dataclass
class RewardResult:
    """total[i] = sum_k weight_k * terms[label_k][i]; replaced[label] = values replaced by the penalty."""

    total: list[float]
    terms: dict[str, list[float]]
    replaced: dict[str, int]


class CombinedReward:
    """The weighted sum of the configured reward terms; itself a reward function."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.functions: list[tuple[RewardTermConfig, RewardFn]] = [(t, build_reward(t.name, t.kwargs))
                                                                    for t in config.terms]

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> RewardResult:
        check_inputs(prompts, responses, metadata)
        total = [0.0] * len(responses)
        terms: dict[str, list[float]] = {}
        replaced: dict[str, int] = {}
        for term, fn in self.functions:
            values, n_bad = check_rewards(term.label, fn(prompts, responses, metadata), prompts, metadata,
                                          self.config.nonfinite_penalty)
            terms[term.label], replaced[term.label] = values, n_bad
            total = [acc + term.weight * v for acc, v in zip(total, values)]
        # Each term is finite; an overflowing weighted sum is still refused, naming the prompt.
        total, _ = check_rewards("weighted sum", total, prompts, metadata, None)
        return RewardResult(total=total, terms=terms, replaced=replaced)

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        return self.score(prompts, responses, metadata).total

    def score_records(self, records: Sequence[Any], responses: list[str],
                      response_lengths: Optional[Sequence[int]] = None) -> RewardResult:
        """score() for prompt records (anything with `.text` and `.reward_metadata()`, e.g. data's
        PromptRecord), one record per response; response_lengths (tokens) go to metadata 'response_tokens'
        (the `overlong` term reads them)."""
        metadata = [r.reward_metadata() for r in records]
        if response_lengths is not None:
            if len(response_lengths) != len(metadata):
                raise ValueError(f"rewards: {len(response_lengths)} response lengths for {len(metadata)} responses")
            metadata = [{**m, "response_tokens": int(n)} for m, n in zip(metadata, response_lengths)]
        return self.score([r.text for r in records], responses, metadata)

    def close(self) -> None:
        """Release what the terms hold (math_verify's worker processes); every term's close() is tried."""
        errors = []
        for _, fn in self.functions:
            close = getattr(fn, "close", None)  # a reward function may be a plain function (user rewards)
            if callable(close):
                try:
                    close()
                except Exception as exc:  # noqa: BLE001 -- close the others, then report the first
                    errors.append(exc)
        if errors:
            raise errors[0]


def build_rewards(config: RewardConfig | Mapping[str, Any]) -> CombinedReward:
    """The trainer's entry point: a CombinedReward from a RewardConfig or its dict form."""
    return CombinedReward(config if isinstance(config, RewardConfig) else reward_config_from_dict(config))
