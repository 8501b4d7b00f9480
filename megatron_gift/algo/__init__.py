"""Losses and group statistics for grouped RL fine-tuning (pure torch; never imports megatron or vllm)."""
from megatron_gift.algo.gift import GIFTConfig, GIFTLoss
from megatron_gift.algo.dapo import DAPOConfig, DAPOLoss
from megatron_gift.algo.grpo import GRPOConfig, GRPOLoss
from megatron_gift.algo.gspo import GSPOConfig, GSPOLoss
from megatron_gift.algo.loss import AnalyticLoss, Loss, check_loss, has_coefficients, needs_reference_model
from megatron_gift.algo.registry import build_loss, loss_names, register_loss
from megatron_gift.algo.validate import GroupSplitError, NonFiniteError, check_loss_inputs, check_no_group_in_two

__all__ = [
    "GIFTConfig", "GIFTLoss", "GRPOConfig", "GRPOLoss", "DAPOConfig", "DAPOLoss", "GSPOConfig", "GSPOLoss",
    "build_loss", "loss_names", "register_loss",
    "AnalyticLoss", "Loss", "check_loss", "has_coefficients", "needs_reference_model",
    "GroupSplitError", "NonFiniteError", "check_loss_inputs", "check_no_group_in_two",
]
