"""Settings the config accepts (the dry run costs them as what-ifs) that the trainer does not implement.

Owns the trainer's refusals, checked first thing in `Trainer.__init__` (before the runtime, the models or
the engines are started), so that no setting is accepted and then ignored:
- `parallel.vpp` > 1: the trainer builds one model chunk per pipeline stage (no virtual-pipeline chunks);
- `precision.dtype: float16`: fp16 training needs Float16Module plus dynamic loss scaling in the optimizer,
  which the trainer does not set up (bfloat16 needs no loss scaling and is what the recipes use).
"""
from __future__ import annotations


def check_trainer_supports(cfg) -> None:
    """Raise a ValueError naming the key of the first setting this trainer would otherwise ignore."""
    vpp = cfg.parallel.vpp
    if vpp is not None and vpp > 1:
        raise ValueError(f"parallel.vpp={vpp}: the trainer builds one model chunk per pipeline stage (no "
                         "interleaved virtual pipeline); leave parallel.vpp unset (or 1). The dry run still "
                         "costs vpp > 1 as a what-if.")
    if cfg.precision.dtype == "float16":
        raise ValueError("precision.dtype=float16: the trainer has no fp16 loss scaling; use bfloat16 "
                         "(or float32)")
