"""Numeric precision of training: parameter dtype and FP8 through Transformer Engine.

Owns the mapping from the run config's precision section onto Megatron's TransformerConfig fields
(`bf16` / `fp16` / `params_dtype`, `fp8`, `fp8_recipe`, `fp8_amax_history_len`, ...) and the checks
that FP8 can actually run: Transformer Engine importable, a CUDA device, and a compute capability the
recipe supports (FP8 needs Hopper / Ada sm_89+, MXFP8 needs Blackwell sm_100+). Megatron's transformer
block enters TE's fp8 autocast per layer itself (megatron.core.fp8_utils.get_fp8_context), so nothing
else in the step changes. Never imported on the loss path.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PrecisionConfig:
    """dtype: parameters and activations; fp8: None (off), 'e4m3' or 'hybrid' (e4m3 fwd, e5m2 grads).

    fp8_recipe: delayed (amax history), tensorwise (current scaling), blockwise, mxfp8.
    fp8_param: keep FP8 primary weights (saves memory; needs the distributed optimizer in Megatron).
    """

    dtype: str = "bfloat16"
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_margin: int = 0
    fp8_param: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"precision dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ValueError(f"precision fp8 {self.fp8!r} is not one of {FP8_FORMATS} (or null to disable)")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"precision fp8_recipe {self.fp8_recipe!r} is not one of {FP8_RECIPES}")
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"precision fp8_amax_compute_algo {self.fp8_amax_compute_algo!r} is not 'max' or 'most_recent'")
        if self.fp8_amax_history_len < 1:
            raise ValueError(f"precision fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}")
        if self.fp8 is not None and self.dtype == "float32":
            raise ValueError("precision fp8 needs dtype bfloat16 or float16 for the non-FP8 parts, not float32")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def _te_importable() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def check_fp8_supported(cfg: PrecisionConfig, *, te_importable: Callable[[], bool] = _te_importable,
                        capability: Optional[Tuple[int, int]] = None) -> None:
    """Raise a clear error when cfg asks for FP8 that this machine cannot run."""
    if cfg.fp8 is None:
        return
    if not te_importable():
        raise RuntimeError(f"precision fp8={cfg.fp8!r} needs Transformer Engine (pip install -e .[gpu]); "
                           "it is not importable here. Set precision.fp8: null to train in "
                           f"{cfg.dtype} without FP8.")
    if capability is None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"precision fp8={cfg.fp8!r} needs a CUDA GPU; none is available")
        capability = torch.cuda.get_device_capability()
    need = _MIN_CAPABILITY[cfg.fp8_recipe]
    if tuple(capability) < need:
        raise RuntimeError(f"fp8_recipe {cfg.fp8_recipe!r} needs compute capability >= {need[0]}.{need[1]}; "
                           f"this GPU has {capability[0]}.{capability[1]}")


def transformer_precision_kwargs(cfg: PrecisionConfig) -> Dict[str, Any]:
    """TransformerConfig keyword arguments for this precision (validated with check_fp8_supported first)."""
    kwargs: Dict[str, Any] = {
        "params_dtype": cfg.torch_dtype, "pipeline_dtype": cfg.torch_dtype,
        "bf16": cfg.dtype == "bfloat16", "fp16": cfg.dtype == "float16",
    }
    if cfg.fp8 is not None:
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe, fp8_margin=cfg.fp8_margin,
                      fp8_amax_history_len=cfg.fp8_amax_history_len,
                      fp8_amax_compute_algo=cfg.fp8_amax_compute_algo, fp8_param=cfg.fp8_param)
    return kwargs
