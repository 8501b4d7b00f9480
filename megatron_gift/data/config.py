"""Typed configuration of the prompt data (L1).

Owns `PromptDataConfig`, its value checks, and building it from a plain dict (YAML) with unknown keys
rejected by name. It does not load or tokenise anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from megatron_gift.utils.dataclass_dict import from_dict

FORMATS = ("auto", "jsonl", "json", "parquet", "arrow-dir")
BAD_ROW_POLICIES = ("error", "skip")


@dataclass
class PromptDataConfig:
    """Where the prompts are and how rows become prompt records.

    path              a .jsonl / .json / .parquet file, a `datasets.save_to_disk` directory, or a Hub dataset
                      id ("org/name", through `datasets`; from the local cache when HF_HUB_OFFLINE is set).
    format            one of FORMATS; `auto` picks from the suffix (a directory means arrow-dir).
    prompt_key        the row field holding the prompt text (e.g. "prompt" or "question").
    answer_key        the row field holding the reference answer ("answer" / "solution"); None: no answer.
    metadata_keys     further row fields passed through to the reward functions (missing -> error).
    max_prompt_tokens prompts longer than this (after the chat template) are dropped and counted.
    apply_chat_template  wrap the prompt as a user message with the tokenizer's chat template.
    system_prompt     optional system message (only with apply_chat_template).
    on_bad_row        "error": stop at the first malformed row; "skip": drop it and count it.
    split             the split to take when `path` holds a DatasetDict directory.
    max_prompts       keep only the first this many usable prompts (0: all), e.g. a small RL prompt pool.
    """

    path: str
    format: str = "auto"
    prompt_key: str = "prompt"
    answer_key: Optional[str] = "answer"
    metadata_keys: list[str] = field(default_factory=list)
    max_prompt_tokens: int = 2048
    apply_chat_template: bool = True
    system_prompt: Optional[str] = None
    on_bad_row: str = "error"
    split: str = "train"
    max_prompts: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"prompt data config: 'path' must be a non-empty string, got {self.path!r}")
        if self.format not in FORMATS:
            raise ValueError(f"prompt data config: 'format' is {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"prompt data config: 'on_bad_row' is {self.on_bad_row!r}; "
                             f"valid: {', '.join(BAD_ROW_POLICIES)}")
        if not isinstance(self.prompt_key, str) or not self.prompt_key:
            raise ValueError(f"prompt data config: 'prompt_key' must be a non-empty string, got {self.prompt_key!r}")
        if self.answer_key is not None and (not isinstance(self.answer_key, str) or not self.answer_key):
            raise ValueError(f"prompt data config: 'answer_key' must be a non-empty string or null, "
                             f"got {self.answer_key!r}")
        if isinstance(self.metadata_keys, str) or not all(isinstance(k, str) for k in self.metadata_keys):
            raise ValueError(f"prompt data config: 'metadata_keys' must be a list of strings, "
                             f"got {self.metadata_keys!r}")
        self.metadata_keys = list(self.metadata_keys)
        reserved = {self.prompt_key, self.answer_key}
        clash = [k for k in self.metadata_keys if k in reserved]
        if clash:
            raise ValueError(f"prompt data config: 'metadata_keys' repeats the prompt/answer key {clash[0]!r}")
        if isinstance(self.max_prompt_tokens, bool) or not isinstance(self.max_prompt_tokens, int) \
                or self.max_prompt_tokens <= 0:
            raise ValueError(f"prompt data config: 'max_prompt_tokens' must be a positive int, "
                             f"got {self.max_prompt_tokens!r}")
        if not isinstance(self.apply_chat_template, bool):
            raise ValueError(f"prompt data config: 'apply_chat_template' must be true/false, "
                             f"got {self.apply_chat_template!r}")
        if isinstance(self.max_prompts, bool) or not isinstance(self.max_prompts, int) or self.max_prompts < 0:
            raise ValueError(f"prompt data config: 'max_prompts' must be an int >= 0, got {self.max_prompts!r}")
        if self.system_prompt is not None and not self.apply_chat_template:
            raise ValueError("prompt data config: 'system_prompt' needs 'apply_chat_template: true'")


def prompt_data_config_from_dict(data: Mapping[str, Any], where: str = "prompt data config") -> PromptDataConfig:
    """Build a PromptDataConfig from a dict; an unknown key is an error naming the nearest valid key."""
    return from_dict(PromptDataConfig, data, where=where)
