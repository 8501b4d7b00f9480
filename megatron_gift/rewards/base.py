"""The reward function contract and the check every reward's output passes through (L1).

A reward function is `fn(prompts, responses, metadata) -> list[float]`: one float per response, where
prompts[i] / metadata[i] belong to responses[i]. This module owns that type, the error raised for a
wrong-length, missing or non-finite output (naming the response's prompt), and the optional
`nonfinite_penalty` replacement with its count.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


class RewardError(ValueError):
    """A reward function misbehaved or its input is unusable; the message names the reward and the prompt."""


def describe_prompt(i: int, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> str:
    """'response 3 (dataset row 17, prompt "What is 1 + 2?...")': enough to find the prompt again."""
    text = prompts[i] if i < len(prompts) else ""
    snippet = text[:60].replace("\n", " ") + ("..." if len(text) > 60 else "")
    row = ""
    if metadata is not None and i < len(metadata) and isinstance(metadata[i], dict) and "index" in metadata[i]:
        row = f"dataset row {metadata[i]['index']}, "
    return f'response {i} ({row}prompt "{snippet}")'


def check_inputs(prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[dict]) -> None:
    """prompts, responses and metadata must line up one to one."""
    if not (len(prompts) == len(responses) == len(metadata)):
        raise RewardError(f"rewards: got {len(prompts)} prompts, {len(responses)} responses and {len(metadata)} "
                          f"metadata dicts; they must be the same length (one prompt per response)")


def _as_float(value: Any) -> Optional[float]:
    """float(value) for real numbers (Python, numpy, 0-d torch); None for missing; TypeError otherwise."""
    if value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return float(value.item())
    raise TypeError(type(value).__name__)


def check_rewards(name: str, values: Any, prompts: Sequence[str], metadata: Sequence[dict],
                  nonfinite_penalty: Optional[float] = None) -> tuple[list[float], int]:
    """Validated floats from reward `name`, and how many were replaced by `nonfinite_penalty`.

    A missing (None) or non-finite value is an error naming the prompt unless a penalty is configured.
    """
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward '{name}' returned {type(values).__name__}, expected a list of floats") from None
    if len(values) != len(prompts):
        raise RewardError(f"reward '{name}' returned {len(values)} values for {len(prompts)} responses")
    out: list[float] = []
    replaced = 0
    for i, value in enumerate(values):
        try:
            number = _as_float(value)
        except TypeError as exc:
            raise RewardError(f"reward '{name}' returned a {exc} for {describe_prompt(i, prompts, metadata)}; "
                              f"expected a float") from None
        if number is None or not math.isfinite(number):
            if nonfinite_penalty is None:
                what = "no value (None)" if number is None else repr(number)
                raise RewardError(f"reward '{name}' gave {what} for {describe_prompt(i, prompts, metadata)}; "
                                  f"set 'nonfinite_penalty' to replace such rewards instead")
            number, replaced = float(nonfinite_penalty), replaced + 1
        out.append(number)
    return out, replaced
