"""Loss registry: a loss is chosen by name; a new loss is one class plus one line here.

Owns the mapping name -> (loss class, config dataclass) (a utils/registry.py Registry, whose error names an
unknown name) and the check that what a loss class builds follows the `Loss` protocol (algo/loss.py).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Tuple, Type

from megatron_gift.algo.gift import GIFTConfig, GIFTLoss
from megatron_gift.algo.dapo import DAPOConfig, DAPOLoss
from megatron_gift.algo.grpo import GRPOConfig, GRPOLoss
from megatron_gift.algo.gspo import GSPOConfig, GSPOLoss
from megatron_gift.algo.loss import Loss, check_loss
from megatron_gift.utils.dataclass_dict import from_dict
from megatron_gift.utils.registry import Registry

_LOSSES: Registry[Tuple[Callable[..., Any], Type]] = Registry("loss", "losses", {
    "gift": (GIFTLoss, GIFTConfig),
    "grpo": (GRPOLoss, GRPOConfig),
    "dapo": (DAPOLoss, DAPOConfig),
    "gspo": (GSPOLoss, GSPOConfig),
})


def register_loss(name: str, loss_cls: Callable[..., Any], config_cls: Type) -> None:
    """Add a loss under `name` (constructor takes one config dataclass instance)."""
    _LOSSES.register(name, (loss_cls, config_cls))


def loss_names() -> list[str]:
    return _LOSSES.names()


def build_loss(name: str, options: Mapping[str, Any] | None = None) -> Loss:
    """Instantiate the loss registered as `name` with its config built from `options`."""
    loss_cls, config_cls = _LOSSES.get(name)
    return check_loss(loss_cls(from_dict(config_cls, options, where=f"loss '{name}' options")))
