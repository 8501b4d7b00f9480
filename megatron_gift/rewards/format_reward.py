"""Format reward (L1): does the response state a final answer in the expected form?

Owns one regex check. The default accepts a GSM8K final line "#### <number>" or a LaTeX \\boxed{...}.
"""
from __future__ import annotations

import re
from typing import Any

from megatron_gift.rewards.base import check_inputs

DEFAULT_PATTERN = r"####\s*[-+]?\d[\d,]*(?:\.\d+)?\s*$|\\boxed\{.+\}"


class FormatReward:
    """fn(prompts, responses, metadata) -> [match_value | miss_value] with re.search(pattern, response).

    The pattern is compiled with re.MULTILINE, so '$' also matches at a line end.
    """

    def __init__(self, pattern: str = DEFAULT_PATTERN, match_value: float = 1.0, miss_value: float = 0.0) -> None:
        try:
            self.regex = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise ValueError(f"format reward: invalid 'pattern' {pattern!r}: {exc}") from None
        self.match_value, self.miss_value = float(match_value), float(miss_value)

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        check_inputs(prompts, responses, metadata)
        return [self.match_value if self.regex.search(r) else self.miss_value for r in responses]


def build_format(**kwargs: Any) -> FormatReward:
    return FormatReward(**kwargs)
