"""Reward registry (L1): a reward is chosen by name and built from keyword arguments.

Owns name -> factory and the error for an unknown name (listing the valid names and the nearest). A name
containing ':' is a user function's import path ("package.module:function"), loaded by rewards/user.py.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from megatron_gift.rewards.base import RewardFn
from megatron_gift.rewards.format_reward import build_format
from megatron_gift.rewards.math_reward import build_math_verify
from megatron_gift.rewards.overlong import build_overlong
from megatron_gift.rewards.reward_model import build_reward_model
from megatron_gift.rewards.user import build_user_reward
from megatron_gift.utils.registry import Registry

RewardFactory = Callable[..., RewardFn]

_REWARDS: Registry[RewardFactory] = Registry("reward", "rewards", {
    "math_verify": build_math_verify,
    "format": build_format,
    "reward_model": build_reward_model,
    "overlong": build_overlong,
}, hint=", or a user function as 'package.module:function'")


def register_reward(name: str, factory: RewardFactory) -> None:
    """Add a reward under `name`; `factory(**kwargs)` returns fn(prompts, responses, metadata) -> floats."""
    if ":" in name:
        raise ValueError(f"reward name {name!r}: ':' is reserved for import paths")
    _REWARDS.register(name, factory)


def reward_names() -> list[str]:
    return _REWARDS.names()


def build_reward(name: str, kwargs: Optional[Mapping[str, Any]] = None) -> RewardFn:
    """The reward function registered as `name` (or at import path `name`) built with `kwargs`."""
    kwargs = dict(kwargs or {})
    if ":" in name:
        return build_user_reward(name, **kwargs)
    factory = _REWARDS.get(name)
    try:
        return factory(**kwargs)
    except TypeError as exc:  # a misspelt kwarg reaches the constructor as a TypeError; say which reward
        raise ValueError(f"reward '{name}': bad kwargs {sorted(kwargs)}: {exc}") from exc
