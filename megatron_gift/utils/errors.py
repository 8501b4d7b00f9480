"""Which errors are the user's (a config, data, checkpoint-selection or path problem) and how a command reports them.

Owns: `UserError` (a problem with the input: reported as one line naming the key / file / row, no traceback),
the tuple of existing error classes that mean the same (prompt data, checkpoints, unsupported model configs),
and `report_user_error`: the line on stderr (with the rank under torchrun) and, under torchrun, the same line
in the worker's error file, so that torchrun's closing failure summary ends with the cause instead of "To
enable traceback see ...". Internal errors are not caught here: they keep their traceback.
"""
from __future__ import annotations

import json
import os
import sys
import time

USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """The input is wrong (config key, data file, checkpoint, path); the message says which and how to fix it."""


def user_error_types() -> tuple:
    """UserError and the existing error classes that only ever describe bad input."""
    from megatron_gift.data.rows import PromptDataError
    from megatron_gift.hf.arch import UnsupportedConfigError
    from megatron_gift.hf.files import CheckpointError

    return (UserError, PromptDataError, CheckpointError, UnsupportedConfigError)


def report_user_error(exc: BaseException) -> int:
    """Print `error: <message>` (one line) and record it for torchrun; returns the exit code."""
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    line = f"error{where}: {' '.join(str(exc).split())}"
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as fh:
                json.dump({"message": line, "timestamp": int(time.time())}, fh)
        except OSError:
            pass
    return USER_ERROR_EXIT_CODE


def record_internal_error(exc: BaseException) -> None:
    """Under torchrun: the exception and its traceback into the worker's error file (as torch's @record does)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
