"""The model's tokenizer behind one small interface (L1).

Owns loading a tokenizer from a Hugging Face tokenizer directory (tokenizer.json / tokenizer_config.json,
through transformers.AutoTokenizer) or a sentencepiece `.model` file, and the operations the data
pipeline needs: encode, decode, eos / pad ids, and rendering a chat. Both wrappers expose the same
methods so the rest of the code never asks which kind it holds.
"""
from __future__ import annotations

import os
from typing import Optional, Protocol, runtime_checkable

Messages = list[dict[str, str]]


@runtime_checkable
class PromptTokenizer(Protocol):
    """What the data pipeline, rewards and rollouts need from a tokenizer."""

    name: str

    @property
    def eos_token_id(self) -> Optional[int]: ...

    @property
    def pad_token_id(self) -> Optional[int]: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def has_chat_template(self) -> bool: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def render_chat(self, messages: Messages) -> str: ...


class HFTokenizer:
    """A transformers tokenizer (usually PreTrainedTokenizerFast) behind PromptTokenizer."""

    def __init__(self, tokenizer, name: str = "") -> None:
        self.hf = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", "") or "hf-tokenizer"

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Messages) -> str:
        """The chat as text, ending with the assistant's generation prompt."""
        if not self.has_chat_template:
            raise ValueError(f"tokenizer {self.name} has no chat template; set 'apply_chat_template: false' "
                             f"or use a tokenizer that defines one")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class SentencePieceTokenizer:
    """A sentencepiece `.model` file behind PromptTokenizer. It has no chat template."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.name = model_file

    @staticmethod
    def _id(value: int) -> Optional[int]:
        return value if value >= 0 else None  # sentencepiece reports a disabled special token as -1

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id(self.sp.eos_id())

    @property
    def pad_token_id(self) -> Optional[int]:
        pad = self._id(self.sp.pad_id())
        return pad if pad is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def has_chat_template(self) -> bool:
        return False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self.sp.encode(text))
        bos = self._id(self.sp.bos_id())
        return [bos] + ids if add_special_tokens and bos is not None else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = {self._id(self.sp.bos_id()), self._id(self.sp.eos_id()), self._id(self.sp.pad_id())}
        keep = [i for i in ids if not (skip_special_tokens and i in special)]
        return self.sp.decode(keep)

    def render_chat(self, messages: Messages) -> str:
        raise ValueError(f"sentencepiece tokenizer {self.name} has no chat template; "
                         f"set 'apply_chat_template: false'")


def load_tokenizer(path: str) -> PromptTokenizer:
    """A Hugging Face tokenizer directory, or a sentencepiece `.model` file."""
    if os.path.isfile(path) and path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ValueError(f"{path}: no tokenizer.json or tokenizer_config.json in this directory")
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(path), name=path)
    raise ValueError(f"tokenizer not found: {path} (expected a Hugging Face tokenizer directory "
                     f"or a sentencepiece .model file)")
