"""Prompt data (L1): config, loading and row checks, tokenizers, prompt records, the resumable sampler,
and the tiny arithmetic demo task. No megatron or vllm imports here."""
from megatron_gift.data.arithmetic import make_arithmetic_dataset, make_arithmetic_tokenizer
from megatron_gift.data.config import PromptDataConfig, prompt_data_config_from_dict
from megatron_gift.data.dataset import PromptDataset, PromptRecord, build_prompt_dataset
from megatron_gift.data.loading import LoadStats
from megatron_gift.data.rows import PromptDataError, RawPrompt
from megatron_gift.data.sampler import PromptSampler, epoch_order
from megatron_gift.data.tokenizer import HFTokenizer, PromptTokenizer, SentencePieceTokenizer, load_tokenizer

__all__ = [
    "HFTokenizer", "LoadStats", "PromptDataConfig", "PromptDataError", "PromptDataset", "PromptRecord",
    "PromptSampler", "PromptTokenizer", "RawPrompt", "SentencePieceTokenizer", "build_prompt_dataset", "epoch_order",
    "load_tokenizer", "make_arithmetic_dataset", "make_arithmetic_tokenizer", "prompt_data_config_from_dict",
]
