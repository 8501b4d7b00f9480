"""`python -m megatron_gift.train CONFIG.yaml ...`: the training command (megatron_gift/cli/train.py)."""
from megatron_gift.cli.train import main, parse_args  # noqa: F401
