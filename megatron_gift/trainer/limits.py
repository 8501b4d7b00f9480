"""Settings the config accepts (the dry run costs them as what-ifs) that the trainer does not implement.

Owns the trainer's refusals, checked first thing in `Trainer.__init__` (before the runtime, the models or
the engines are started), so that no setting is accepted and then ignored:
- `parallel.vpp` > 1: the trainer builds one model chunk per pipeline stage (no virtual-pipeline chunks);
- `optim.bf16` / `optim.fp16` set against `precision.dtype`: the trainer sets them from precision.dtype.
"""
from __future__ import annotations


def check_trainer_supports(cfg) -> None:
    """Raise a ValueError naming the key of the first setting this trainer would otherwise ignore."""
    vpp = cfg.parallel.vpp
    if vpp is not None and vpp > 1:
        raise ValueError(f"parallel.vpp={vpp}: the trainer builds one model chunk per pipeline stage (no "
                         "interleaved virtual pipeline); leave parallel.vpp unset (or 1). The dry run still "
                         "costs vpp > 1 as a what-if.")
    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if getattr(cfg.optim, key) and cfg.precision.dtype != dtype:
            raise ValueError(f"optim.{key}=true with precision.dtype={cfg.precision.dtype}: the optimizer's "
                             f"precision follows precision.dtype; set precision.dtype={dtype} instead")
