"""Reward-model scorer (L1): a Hugging Face sequence-classification model scores (prompt, response) pairs.

Owns loading the model and tokenizer from a local directory, formatting each pair (the tokenizer's chat
template when it has one, else plain concatenation), batched padded inference, and returning one float
per response (the logit `label_index`). Runs wherever it is built (CPU by default); it does not share
the policy's devices or process groups.
"""
from __future__ import annotations

from typing import Any, Optional

from megatron_gift.rewards.base import check_inputs

# torch / transformers are imported where used: math_verify pool workers import this package and must
# start fast.
_DTYPES = ("float32", "bfloat16", "float16")


class RewardModelScorer:
    """fn(prompts, responses, metadata) -> model scores.

    path              local directory with the model (AutoModelForSequenceClassification) and its tokenizer.
    batch_size        pairs per forward pass.
    max_length        truncate longer inputs (from the right: the prompt start is kept) when set.
    use_chat_template "auto": when the tokenizer has one; True: required; False: prompt + response.
    label_index       which output logit is the score (0 for the usual num_labels=1 reward model).
    """

    def __init__(self, path: str, batch_size: int = 8, max_length: Optional[int] = None, device: str = "cpu",
                 dtype: str = "float32", use_chat_template: Any = "auto", label_index: int = 0) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"reward model: 'dtype' is {dtype!r}; valid: {', '.join(_DTYPES)}")
        if batch_size <= 0:
            raise ValueError(f"reward model: 'batch_size' must be positive, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:  # batching needs a pad id; EOS is the usual stand-in
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model = model.to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if not 0 <= label_index < self.model.config.num_labels:
            raise ValueError(f"reward model {path}: label_index {label_index} out of range for "
                             f"num_labels={self.model.config.num_labels}")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat_template is True and not has_template:
            raise ValueError(f"reward model {path}: use_chat_template is true but the tokenizer has no chat template")
        self.use_chat_template = has_template if use_chat_template == "auto" else bool(use_chat_template)
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.device, self.label_index = device, label_index

    def format_pair(self, prompt: str, response: str) -> str:
        if not self.use_chat_template:
            return prompt + response
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(chat, tokenize=False)

    def score_texts(self, texts: list[str]) -> list[float]:
        """Scores of already formatted texts, `batch_size` at a time."""
        import torch

        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=self.max_length is not None, max_length=self.max_length,
                                   add_special_tokens=not self.use_chat_template)
            with torch.no_grad():
                logits = self.model(**batch.to(self.device)).logits  # [b, num_labels]
            scores.extend(logits[:, self.label_index].float().cpu().tolist())
        return scores

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        check_inputs(prompts, responses, metadata)
        return self.score_texts([self.format_pair(p, r) for p, r in zip(prompts, responses)])


def build_reward_model(**kwargs: Any) -> RewardModelScorer:
    if "path" not in kwargs:
        raise ValueError("reward model: kwargs need 'path' (a local model directory)")
    return RewardModelScorer(**kwargs)
