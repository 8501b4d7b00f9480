"""Command-line shim: the command lives in megatron_gift/cli/plot.py (console script megatron-gift-plot)."""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gift.cli.plot import *  # noqa: E402,F401,F403
from megatron_gift.cli.plot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
