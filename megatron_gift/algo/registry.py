"""Loss registry: a loss is chosen by name; a new loss is one class plus one line here.

Owns the mapping name -> (loss class, config dataclass) and the error for an unknown name.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple, Type

from megatron_gift.algo.gift import GIFTConfig, GIFTLoss
from megatron_gift.algo.dapo import DAPOConfig, DAPOLoss
from megatron_gift.algo.grpo import GRPOConfig, GRPOLoss
from megatron_gift.algo.gspo import GSPOConfig, GSPOLoss
from megatron_gift.utils.dataclass_dict import from_dict, nearest

_LOSSES: Dict[str, Tuple[Callable[..., Any], Type]] = {
    "gift": (GIFTLoss, GIFTConfig),
    "grpo": (GRPOLoss, GRPOConfig),
    "dapo": (DAPOLoss, DAPOConfig),
    "gspo": (GSPOLoss, GSPOConfig),
}


def register_loss(name: str, loss_cls: Callable[..., Any], config_cls: Type) -> None:
    """Add a loss under `name` (constructor takes one config dataclass instance)."""
    if name in _LOSSES:
        raise ValueError(f"loss '{name}' is already registered")
    _LOSSES[name] = (loss_cls, config_cls)


def loss_names() -> list[str]:
    return sorted(_LOSSES)


def build_loss(name: str, options: Mapping[str, Any] | None = None):
    """Instantiate the loss registered as `name` with its config built from `options`."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss '{name}'{nearest(name, _LOSSES)} (valid losses: {', '.join(loss_names())})")
    loss_cls, config_cls = _LOSSES[name]
    return loss_cls(from_dict(config_cls, options, where=f"loss '{name}' options"))
