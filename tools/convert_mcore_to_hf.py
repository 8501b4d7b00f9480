"""Command-line shim: the command lives in megatron_gift/cli/convert_mcore_to_hf.py (console script megatron-gift-convert-mcore-to-hf)."""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gift.cli.convert_mcore_to_hf import *  # noqa: E402,F401,F403  (library entry points, e.g. convert())
from megatron_gift.cli.convert_mcore_to_hf import main  # noqa: E402

if __name__ == "__main__":  # guard required: dist_checkpointing spawns writer processes
    sys.exit(main())
