"""`python -m megatron_gift.checkpoint verify DIR...`: check training checkpoints against their completion markers.

DIR is one checkpoint (step_N/) or a save_dir (every step_N/ in it is checked). Every damaged file is
reported (missing, wrong size, content no longer matching the checksum recorded at save time); exit code 0
when all are intact, 1 when any is damaged or incomplete, 2 for a wrong argument.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

from megatron_gift.checkpoint.manager import MARKER, CheckpointManager, damaged_files


def check_one(path: Path) -> List[str]:
    """Every problem of one checkpoint, one line each (empty: intact)."""
    marker = path / MARKER
    if not marker.is_file():
        return [f"{path}: no completion marker {MARKER} (save interrupted?)"]
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{path}: unreadable marker: {exc}"]
    problems = []
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != size:
            problems.append(f"{f}: {f.stat().st_size} bytes, {size} recorded (truncated or rewritten)")
    wrong_size = {rel for rel, size in files.items() if not (path / rel).is_file() or (path / rel).stat().st_size != size}
    return problems + [f"{path / rel}: {why}" for rel, why in damaged_files(path) if rel not in wrong_size]


def _has_checksums(path: Path) -> bool:
    try:
        return bool(json.loads((path / MARKER).read_text()).get("checksums"))
    except (OSError, ValueError):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_gift.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check checkpoints against their recorded sizes and checksums")
    v.add_argument("dirs", nargs="+", type=Path, help="a step_N checkpoint or a save_dir")
    args = p.parse_args(argv)
    failed = 0
    for d in args.dirs:
        if not d.is_dir():
            p.error(f"{d}: no such directory")
        ckpts = [d] if (d / MARKER).exists() or d.name.startswith("step_") else \
            [c.path for c in CheckpointManager(d, log=lambda m: None).candidates()]
        if not ckpts:
            p.error(f"{d}: neither a checkpoint (step_N/) nor a save_dir holding any")
        for ck in ckpts:
            problems = check_one(ck)
            failed += bool(problems)
            note = "" if _has_checksums(ck) else " (no checksums recorded, saved by an older version: sizes only)"
            print(f"{ck}: OK{note}" if not problems else "\n".join(f"DAMAGED {line}" for line in problems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
