"""megatron-gift: GIFT (Group-relative Implicit Fine Tuning) on Megatron-Core with vLLM rollouts."""

__version__ = "0.1.0"
