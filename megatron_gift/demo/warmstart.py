"""A tiny warm-started policy for the embedded CPU default (no model hub needed).

Owns: making a small Llama from a config with the run's tokenizer, a short supervised fine-tune on the
prompt data's reference solutions (loss on the solution tokens only), and saving it as a Hugging Face
checkpoint that the trainer, the converters and vLLM load. The result is cached: a complete directory
(config.json + model.safetensors + a marker) is reused; a partial one is never read.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_gift.data import PromptDataConfig, build_prompt_dataset, load_tokenizer

MARKER = "warmstart_complete.json"


def _sequences(data: PromptDataConfig, tokenizer, solution_key: str):
    cfg = dataclasses.replace(data, metadata_keys=sorted(set(data.metadata_keys) | {solution_key}))
    records = build_prompt_dataset(cfg, tokenizer)
    eos = tokenizer.eos_token_id
    out = []
    for r in records.records:
        target = tokenizer.encode(str(r.metadata[solution_key]), add_special_tokens=False) + [eos]
        out.append((r.prompt_ids, target))
    return out


def _batch(pairs, pad_id: int):
    longest = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), longest), -100, dtype=torch.long)
    for i, (p, t) in enumerate(pairs):
        seq = torch.tensor(p + t)
        ids[i, :len(seq)] = seq
        labels[i, len(p):len(seq)] = torch.tensor(t)
    return ids, labels


def make_warmstart_model(cfg, data: PromptDataConfig, tokenizer_dir: str, out_dir: str,
                         log: Optional[Callable[[str], None]] = print) -> str:
    """Train (or reuse) the warm-start model in out_dir; returns out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / MARKER).is_file():
        log(f"[warmstart] reusing {out}")
        return str(out)
    tokenizer = load_tokenizer(tokenizer_dir)
    pairs = _sequences(data, tokenizer, cfg.solution_key)
    torch.manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.hf.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=pad)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(pairs), (cfg.batch_size,), generator=gen).tolist()
        ids, labels = _batch([pairs[i] for i in idx], pad)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"[warmstart] step {step + 1}/{cfg.steps} sft loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.hf.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"steps": cfg.steps, "final_sft_loss": float(loss.detach()), "seconds":
                                          time.perf_counter() - start}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


def prepare_demo_inputs(run_cfg, run_dir: str, log: Optional[Callable[[str], None]] = print) -> None:
    """Make (or reuse) the demo's generated task and warm-start model in run_dir; point run_cfg at them.

    One process only (the trainer calls it on rank 0 and then `point_at_demo_inputs` on the others).
    """
    from megatron_gift.data import make_arithmetic_dataset
    from megatron_gift.data.builtin import builtin_arithmetic_paths

    ws = run_cfg.warmstart
    note = replaced_paths_note(run_cfg, run_dir)
    if note and log is not None:
        log(note)
    if ws.task_max_operand > 0:
        make_arithmetic_dataset(str(Path(run_dir) / "data"), ws.task_n_train, ws.task_n_eval, seed=ws.seed,
                                max_operand=ws.task_max_operand)
    point_at_demo_inputs(run_cfg, run_dir)
    # The supervised warm start sees every prompt of the file, also when RL samples only its first max_prompts.
    sft_data = dataclasses.replace(run_cfg.data, max_prompts=0)
    make_warmstart_model(ws, sft_data, builtin_arithmetic_paths()["tokenizer"], run_cfg.model.hf_dir, log=log)


def replaced_paths_note(run_cfg, run_dir: str) -> Optional[str]:
    """One line saying which configured data paths the generated task replaces (None when it replaces none)."""
    ws = run_cfg.warmstart
    if ws is None or ws.task_max_operand <= 0:
        return None
    data = Path(run_dir) / "data"
    parts = [f"data.path {run_cfg.data.path} -> {data / 'train.jsonl'}"]
    if run_cfg.eval_data is not None:
        parts.append(f"eval_data.path {run_cfg.eval_data.path} -> {data / 'eval.jsonl'}")
    return (f"[warmstart] warmstart.task_max_operand={ws.task_max_operand} generates the task and replaces "
            f"{'; '.join(parts)} (set warmstart.task_max_operand: 0 to train on data.path)")


def point_at_demo_inputs(run_cfg, run_dir: str) -> None:
    """Set model.hf_dir (and the generated task's data paths, when the task is generated) to run_dir's copies."""
    if run_cfg.warmstart is None:
        raise ValueError("model.hf_dir is empty and there is no warmstart section: name a HF checkpoint")
    if run_cfg.warmstart.task_max_operand > 0:
        run_cfg.data.path = str(Path(run_dir) / "data" / "train.jsonl")
        if run_cfg.eval_data is not None:
            run_cfg.eval_data.path = str(Path(run_dir) / "data" / "eval.jsonl")
    run_cfg.model.hf_dir = str(Path(run_dir) / "warmstart")
