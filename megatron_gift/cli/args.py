"""Argument helpers shared by the command-line entry points (argparse types, stderr messages)."""
from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
