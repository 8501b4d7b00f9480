"""Checks on one prompt row (L1): the prompt, the answer and the metadata fields it must hold.

Owns `RawPrompt` and the per-row error messages (naming the row and the key; the caller adds the file).
A prompt is either text or a chat message list ([{"role": ..., "content": ...}, ...], as in verl-style
parquet files). Keys may be dotted paths into nested fields ("reward_model.ground_truth").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_gift.data.config import PromptDataConfig

_MISSING = object()
ROLES = ("system", "user", "assistant")


class PromptDataError(ValueError):
    """A prompt file or row that cannot be used; the message names the file, row and key."""


@dataclass
class RawPrompt:
    """One valid row before tokenisation.

    index     the row's position in the file (0-based, stable).
    text      the prompt text; for a message list, the content of its last user message.
    messages  the chat messages when the row holds a message list, else None.
    """

    index: int
    text: str
    answer: Optional[str]
    metadata: dict[str, Any]
    messages: Optional[list[dict[str, str]]] = None


def lookup(row: dict, key: str) -> Any:
    """row[key], or the nested field at dotted path `key`; _MISSING when absent or None."""
    if key in row:
        value = row[key]
    else:
        value = row
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return _MISSING
            value = value[part]
    return _MISSING if value is None else value


def _as_answer(value: Any) -> Optional[str]:
    """Answers may be numbers in the file (e.g. 42); rewards compare text, so keep a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    return value if isinstance(value, str) and value.strip() else None


def _messages(value: list, index: int, key: str) -> list[dict[str, str]]:
    """A checked chat message list (roles from ROLES, string contents, at least one user message)."""
    out = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in ROLES:
            raise PromptDataError(f"row {index}: key {key!r} message {j} must be {{'role': one of {ROLES}, "
                                  f"'content': str}}, got {msg!r:.80}")
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise PromptDataError(f"row {index}: key {key!r} is empty (no non-empty user message)")
    return out


def check_row(row: dict, index: int, config: PromptDataConfig) -> RawPrompt:
    """Validate one row; raises PromptDataError (without the path, added by the caller) naming the key."""
    key = config.prompt_key
    prompt = lookup(row, key)
    if prompt is _MISSING:
        raise PromptDataError(f"row {index}: missing key {key!r}")
    messages = None
    if isinstance(prompt, list):
        messages = _messages(prompt, index, key)
        prompt = [m["content"] for m in messages if m["role"] == "user"][-1]
    if not isinstance(prompt, str):
        raise PromptDataError(f"row {index}: key {key!r} must be a string or a chat message list, "
                              f"got {type(prompt).__name__}")
    if not prompt.strip():
        raise PromptDataError(f"row {index}: key {key!r} is empty")
    answer = None
    if config.answer_key is not None:
        raw = lookup(row, config.answer_key)
        if raw is _MISSING:
            raise PromptDataError(f"row {index}: missing key {config.answer_key!r}")
        answer = _as_answer(raw)
        if answer is None:
            raise PromptDataError(f"row {index}: key {config.answer_key!r} must be a non-empty string or number, "
                                  f"got {raw!r:.60}")
    metadata = {}
    for meta_key in config.metadata_keys:
        value = lookup(row, meta_key)
        if value is _MISSING:
            raise PromptDataError(f"row {index}: missing metadata key {meta_key!r}")
        metadata[meta_key] = value
    return RawPrompt(index=index, text=prompt, answer=answer, metadata=metadata, messages=messages)


def bad_row_reason(exc: PromptDataError) -> str:
    """A short counter name for a row error (skip mode)."""
    msg = str(exc)
    for reason in ("missing metadata key", "missing key", "must be a string", "is empty", "non-empty string",
                   "message"):
        if reason in msg:
            return reason.replace(" ", "_")
    return "invalid"
