"""Command-line entry: `python -m megatron_gift.train CONFIG.yaml [--set key=value ...]` (or `megatron-gift-train`).

Runs under torchrun for several ranks (gloo on CPU, NCCL on GPU) or as a single process.
`--resume auto|none|PATH` (= --set trainer.resume=...) picks the checkpoint to continue from. Exit codes:
0 done, REQUEUE_EXIT_CODE (75, megatron_gift/resilience/stop.py) stopped on a signal or the wall-clock budget
after saving a checkpoint, or before the first step (requeue the job), 2 a user error (config, data, checkpoint
selection, paths: one line on stderr naming the key / file / row, no traceback; utils/errors.py), anything else
a failure with its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megatron-gift-train", description="GIFT RL fine-tuning on Megatron-Core")
    ap.add_argument("config", help="run config YAML (see examples/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set trainer.steps=3 (repeatable)")
    ap.add_argument("--resume", default=None, metavar="auto|none|PATH",
                    help="checkpoint to resume from: auto (newest complete in the save dir; the default), "
                         "none (fresh start) or a checkpoint directory")
    ap.add_argument("--plot", action="store_true", help="draw reward and loss curves to RUN_DIR/curves.png at the end")
    ap.add_argument("--verbose", action="store_true", help="show the known-harmless third-party warnings too "
                    "(also MEGATRON_GIFT_VERBOSE=1; see megatron_gift/utils/noise.py)")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_gift.resilience.stop import install_early

    install_early()  # a stop signal during start-up is honoured (requeue exit), not fatal
    args = parse_args(argv)
    from megatron_gift.utils.noise import hide_known_warnings
    noise = hide_known_warnings(args.verbose)  # before torch / megatron / vllm are imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM logs a line per weight update at INFO; the step line already says what happened (override: set it).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from megatron_gift.utils.errors import record_internal_error, report_user_error, user_error_types

    try:
        return _train(args, noise)
    except user_error_types() as exc:  # bad input: one line naming the key / file / row, no traceback
        return report_user_error(exc)
    except Exception as exc:  # internal: the traceback follows, and torchrun's summary gets the cause
        record_internal_error(exc)
        raise


def _train(args: argparse.Namespace, noise) -> int:
    from megatron_gift.config.run import load_run_config
    from megatron_gift.resilience.stop import REQUEUE_EXIT_CODE
    from megatron_gift.trainer.preflight import preflight
    from megatron_gift.utils.errors import UserError

    overrides = args.overrides + ([f"trainer.resume={args.resume}"] if args.resume is not None else [])
    try:
        cfg = load_run_config(args.config, overrides)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:  # every config error is the user's
        raise UserError(str(exc)) from None
    preflight(cfg)  # before the warm start, conversions, models and engines
    from megatron_gift.trainer.trainer import Trainer

    trainer = Trainer(cfg)
    _say_hidden(noise)
    try:
        trainer.run()
    finally:
        trainer.close()
        _say_hidden(noise)
    if trainer.requeue_requested:
        return REQUEUE_EXIT_CODE
    if args.plot and int(os.environ.get("RANK", 0)) == 0:
        from megatron_gift.cli.plot import plot_runs
        out = plot_runs([cfg.trainer.run_dir], os.path.join(cfg.trainer.run_dir, "curves.png"))
        print(f"[train] curves written to {out}")
    return 0


def _say_hidden(noise) -> None:
    line = noise.summary("train")
    if line and int(os.environ.get("RANK", 0)) == 0:
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
