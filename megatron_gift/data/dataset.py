"""Prompt records ready for rollouts: validated rows, chat-formatted and tokenised (L1).

Owns `PromptRecord` (what the trainer hands to the rollout engine and to the rewards),
`PromptDataset` (the records of one file plus load statistics and a content fingerprint) and the
long-prompt filter. Reading and row checks live in loading.py, the sampler in sampler.py.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_gift.data.config import PromptDataConfig
from megatron_gift.data.loading import LoadStats, load_raw_prompts
from megatron_gift.data.rows import PromptDataError, RawPrompt
from megatron_gift.data.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)


@dataclass
class PromptRecord:
    """One prompt.

    index      stable row index in the source file (0-based), survives filtering and shuffling.
    text       the prompt as written in the file (no chat template).
    prompt_ids token ids fed to the model (chat template applied when configured).
    answer     reference answer text or None.
    metadata   the configured extra row fields.
    """

    index: int
    text: str
    prompt_ids: list[int]
    answer: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def reward_metadata(self) -> dict[str, Any]:
        """The dict a reward function receives: the extra fields plus `answer`, `index` and `prompt_text`."""
        return {**self.metadata, "answer": self.answer, "index": self.index, "prompt_text": self.text}


def format_prompt(raw: RawPrompt, config: PromptDataConfig, tokenizer: PromptTokenizer) -> list[int]:
    """Token ids of one prompt: through the chat template when asked, plain text otherwise."""
    if not config.apply_chat_template:
        if raw.messages is not None:
            raise PromptDataError(f"{config.path}: row {raw.index}: key {config.prompt_key!r} is a chat message "
                                  f"list, which needs 'apply_chat_template: true'")
        return tokenizer.encode(raw.text, add_special_tokens=True)
    messages = list(raw.messages) if raw.messages is not None else [{"role": "user", "content": raw.text}]
    if config.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": config.system_prompt})
    # The rendered template already holds any BOS token; adding specials again would double it.
    return tokenizer.encode(tokenizer.render_chat(messages), add_special_tokens=False)


class PromptDataset:
    """The usable prompts of one file, in file order."""

    def __init__(self, records: list[PromptRecord], stats: LoadStats, source: str = "") -> None:
        self.records = records
        self.stats = stats
        self.source = source
        self.fingerprint = _fingerprint(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> PromptRecord:
        return self.records[position]


def _fingerprint(records: list[PromptRecord]) -> str:
    """A short hash of the kept rows' indices and token ids: a sampler state is only valid for one dataset."""
    digest = hashlib.blake2b(digest_size=8)
    for rec in records:
        digest.update(rec.index.to_bytes(8, "little"))
        digest.update(len(rec.prompt_ids).to_bytes(4, "little"))
        digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in rec.prompt_ids))
    return digest.hexdigest()


def build_prompt_dataset(config: PromptDataConfig, tokenizer: PromptTokenizer) -> PromptDataset:
    """Load, check, tokenise and length-filter the prompts of `config.path`."""
    if config.apply_chat_template and not tokenizer.has_chat_template:
        raise ValueError(f"prompt data {config.path}: 'apply_chat_template' is true but tokenizer "
                         f"{tokenizer.name} has no chat template")
    raw, stats = load_raw_prompts(config)
    records = []
    for item in raw:
        ids = format_prompt(item, config, tokenizer)
        if len(ids) > config.max_prompt_tokens:
            stats.too_long += 1
            continue
        records.append(PromptRecord(item.index, item.text, ids, item.answer, item.metadata))
        if len(records) == config.max_prompts:
            break
    stats.rows_kept = len(records)
    if stats.too_long:
        logger.warning("%s: dropped %d prompts longer than max_prompt_tokens=%d", config.path, stats.too_long,
                       config.max_prompt_tokens)
    if not records:
        raise ValueError(f"prompt data {config.path}: no usable prompts ({stats.rows_read} rows read, "
                         f"{stats.rows_skipped} malformed, {stats.too_long} too long)")
    logger.info("%s: %d prompts kept of %d rows", config.path, len(records), stats.rows_read)
    return PromptDataset(records, stats, source=config.path)
