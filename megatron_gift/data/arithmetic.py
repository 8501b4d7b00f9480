"""The tiny demo task: short arithmetic word problems and a character-level tokenizer (L1).

Owns `make_arithmetic_dataset` (seeded jsonl train / held-out splits in GSM8K's "#### <answer>" target
format) and `make_arithmetic_tokenizer` (a hub-free PreTrainedTokenizerFast with a chat template and
EOS). The CPU demo and the tests build both on the fly; nothing here downloads anything.
"""
from __future__ import annotations

import json
import os
import random
import string
from typing import Optional

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# Printable ASCII plus newline: every character the task (and most English text) uses.
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    # An expression, not an {% if %} block: HF renders templates with trim_blocks, which would eat the newline.
    "<|{{ message['role'] }}|>\n{{ message['content'] + ('</s>' if message['role'] == 'assistant' else '') }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problem(rng: random.Random, max_operand: int = 50) -> dict[str, str]:
    """One problem: prompt, numeric answer, and a worked GSM8K-style solution ending in '#### <n>'."""
    op = rng.choice(sorted(_OPS))
    a = rng.randint(0, max_operand)
    b = rng.randint(0, max_operand if op != "*" else 12)  # keep products short for a tiny model
    if op == "-" and b > a:
        a, b = b, a  # non-negative answers keep the target format simple
    result = _OPS[op](a, b)
    return {"prompt": f"What is {a} {op} {b}?", "answer": str(result),
            "solution": f"{a} {op} {b} = {result}\n#### {result}"}


def make_arithmetic_dataset(out_dir: str, n_train: int, n_eval: int, seed: int = 0,
                            max_operand: int = 50) -> dict[str, str]:
    """Write train.jsonl and eval.jsonl (disjoint prompts) under out_dir; returns split -> path.

    The same (n_train, n_eval, seed, max_operand) always writes byte-identical files.
    """
    capacity = 3 * (max_operand + 1) ** 2
    if n_train < 0 or n_eval < 0 or n_train + n_eval > capacity // 2:
        raise ValueError(f"arithmetic dataset: n_train + n_eval = {n_train + n_eval} must be in "
                         f"0..{capacity // 2} for max_operand={max_operand}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n_train + n_eval:
        row = arithmetic_problem(rng, max_operand)
        if row["prompt"] not in seen:  # held-out prompts never appear in train
            seen.add(row["prompt"])
            rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, chunk in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in chunk)
    return paths


def build_arithmetic_tokenizer():
    """A character-level PreTrainedTokenizerFast: specials first, then printable ASCII and newline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE without merges splits text into single characters; Fuse joins them back without spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=4096)


def make_arithmetic_tokenizer(out_dir: str, tokenizer: Optional[object] = None) -> str:
    """Save the demo tokenizer (save_pretrained) to out_dir and return out_dir."""
    (tokenizer or build_arithmetic_tokenizer()).save_pretrained(out_dir)
    return out_dir
