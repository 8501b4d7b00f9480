"""Rewards (L1): fn(prompts, responses, metadata) -> list[float] functions, their registry, the weighted
combination the trainer calls, and the output checks (length, missing, non-finite). No megatron / vllm."""
from megatron_gift.rewards.base import RewardError, RewardFn, check_rewards
from megatron_gift.rewards.combine import (CombinedReward, RewardConfig, RewardResult, RewardTermConfig,
                                           build_rewards, reward_config_from_dict)
from megatron_gift.rewards.format_reward import FormatReward
from megatron_gift.rewards.math_reward import MathVerifyReward
from megatron_gift.rewards.registry import build_reward, register_reward, reward_names
from megatron_gift.rewards.reward_model import RewardModelScorer
from megatron_gift.rewards.user import load_user_function

__all__ = [
    "CombinedReward", "FormatReward", "MathVerifyReward", "RewardConfig", "RewardError", "RewardFn",
    "RewardModelScorer", "RewardResult", "RewardTermConfig", "build_reward", "build_rewards", "check_rewards",
    "load_user_function", "register_reward", "reward_config_from_dict", "reward_names",
]
