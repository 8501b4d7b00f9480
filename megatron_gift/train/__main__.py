"""`python -m megatron_gift.train`: see megatron_gift/cli/train.py."""
import sys

from megatron_gift.cli.train import main

if __name__ == "__main__":  # guard required: dist_checkpointing spawns writer processes
    sys.exit(main())
