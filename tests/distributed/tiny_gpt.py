"""A tiny local-spec GPTModel for multi-process tests, and moving its weights / gradients between layouts.

Owns: the model config every layout builds (float32, CPU init, no fused kernels), loading one full set of
weights into any TP / PP layout (TP shards sliced along each parameter's partition_dim, PP layers by
global index, the tied output layer as the embedding), and assembling per-rank gradients back into full
tensors (TP shards concatenated, DP / tied copies checked to agree).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import torch

VOCAB, HIDDEN, HEADS, LAYERS, SEQ, BATCH = 128, 64, 4, 2, 16, 4
ATOL, RTOL = 1e-5, 1e-5


def _config(**extra):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig
    return TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False, **extra)


def _build_model(config, attention: str = "unfused"):
    """attention: "unfused" (Megatron's DotProductAttention) or "sdpa" (the project's local spec, mcore/model.py)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_gift.mcore.model import sdpa_core_attention
    spec = get_gpt_layer_local_spec()
    spec = {"unfused": spec, "sdpa": sdpa_core_attention(spec)}[attention]
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope",
                    share_embeddings_and_output_weights=True,
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def _global_name(model, name: str) -> str:
    """Stage-local layer index -> global index; the last stage's copy of the tied embedding -> its name."""
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    m = re.match(r"(decoder\.layers\.)(\d+)(\..*)", name)
    if m:
        return f"{m[1]}{model.decoder.layers[int(m[2])].layer_number - 1}{m[3]}"
    return name


def _tp_dim(param) -> Optional[int]:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _load(model, full: Dict[str, torch.Tensor]) -> None:
    from megatron.core import parallel_state as ps
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = full[_global_name(model, name)]
            dim = _tp_dim(p)
            if dim is not None:
                src = src.chunk(tp, dim=dim)[tp_rank]
            p.copy_(src)


def _rank_grads(model, attr: str = "main_grad") -> Dict[str, tuple]:
    """This rank's gradients (DDP's `main_grad`, or `grad`) by global name with their TP dim: one entry of
    `_assemble_grads`'s input."""
    return {_global_name(model, n): (_tp_dim(p), getattr(p, attr).detach().clone()) for n, p in model.named_parameters()}


def _assemble_grads(results: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Full gradients from every rank: TP shards concatenated, DP / tied copies checked to agree."""
    shards: Dict[str, Dict[int, tuple]] = {}
    for r in results:
        for name, (dim, g) in r["grads"].items():
            seen = shards.setdefault(name, {})
            if r["tp_rank"] in seen:  # another DP rank or the other tied-embedding stage: must agree
                torch.testing.assert_close(g, seen[r["tp_rank"]][1], atol=ATOL, rtol=RTOL,
                                           msg=lambda m, name=name: f"{name} differs between copies: {m}")
            else:
                seen[r["tp_rank"]] = (dim, g)
    full = {}
    for name, by_rank in shards.items():
        dims = {d for d, _ in by_rank.values()}
        parts = [by_rank[k][1] for k in sorted(by_rank)]
        full[name] = parts[0] if dims == {None} else torch.cat(parts, dim=dims.pop())
    return full
