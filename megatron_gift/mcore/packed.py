"""Running a packed microbatch (algo/seq_packing.py) through a Megatron GPTModel.

Owns the model-side half of sequence packing, by the chunk's core attention:
- THD (`trainer.packing: thd`) through Transformer Engine (GPU) or the local spec's SDPA attention
  (mcore/sdpa_attention.py, CPU): one row of sequences back to back with `PackedSeqParams` (cu_seqlens real
  and padded, max_seqlen); attention and RoPE restart at every boundary (Megatron's own THD code path).
- The block-diagonal causal mask ("rows", or any layout on Megatron's unfused DotProductAttention): the
  mask keeps attention inside each sequence, and RoPE is taken at the per-sequence position ids
  (GPTModel's RoPE otherwise uses the row position 0..S-1): `sequence_rope` gathers the rotary table
  at those positions for the duration of one forward. The fused causal softmax kernel (GPU, half precision)
  would ignore the mask: refused with a clear error.
Context parallelism with packing is refused (the load-balanced CP split assumes one sequence per row).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from megatron_gift.algo.seq_packing import block_causal_mask


def attention_kind(model_chunk: torch.nn.Module) -> str:
    """"te" (Transformer Engine: THD only), "sdpa" (local spec, SDPA core attention: THD or a mask) or
    "unfused" (Megatron's DotProductAttention: a mask only)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_gift.mcore.sdpa_attention import SdpaDotProductAttention
    kinds = {type(m) for m in model_chunk.modules() if isinstance(m, DotProductAttention)}
    if not kinds:
        return "te"
    return "sdpa" if kinds == {SdpaDotProductAttention} else "unfused"


def packed_seq_params(layout):
    """PackedSeqParams for TE's THD attention from a "thd" layout (one row)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=layout.cu_seqlens, cu_seqlens_kv=layout.cu_seqlens,
                           cu_seqlens_q_padded=layout.cu_seqlens_padded,
                           cu_seqlens_kv_padded=layout.cu_seqlens_padded,
                           max_seqlen_q=layout.max_seqlen, max_seqlen_kv=layout.max_seqlen)


def _rotary(model_chunk: torch.nn.Module):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    found = [m for m in model_chunk.modules() if isinstance(m, RotaryEmbedding)]
    return found[0] if found else None


@contextmanager
def sequence_rope(model_chunk: torch.nn.Module, position_ids: Optional[torch.Tensor]):
    """While active, the chunk's RoPE table [S, 1, 1, D] is replaced by its rows at position_ids: [S, R, 1, D]."""
    rotary = _rotary(model_chunk) if position_ids is not None else None
    if rotary is None:
        yield
        return
    index = position_ids.t()

    def gather(_module, _args, emb):
        return emb[:, 0][index]

    handle = rotary.register_forward_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def forward_packed(model_chunk: torch.nn.Module, tokens, position_ids, layout, cp_size: int = 1, **kwargs):
    """Logits [R, S, V_local] of a packed microbatch: THD where the attention takes it, else the block mask
    with per-sequence RoPE.
    kwargs go to the model call (the MoE routers' padding_mask, mcore/moe_aux.py)."""
    if cp_size > 1:
        raise ValueError("trainer.packing with parallel.cp > 1 is not supported; set trainer.packing: none")
    kind = attention_kind(model_chunk)
    if kind == "te" and layout.mode != "thd":
        raise ValueError("Transformer Engine attention needs trainer.packing: thd (got 'rows')")
    if layout.mode == "thd" and kind != "unfused":
        return model_chunk(tokens, position_ids, None, packed_seq_params=packed_seq_params(layout), **kwargs)
    if kind == "unfused":
        _check_mask_is_honoured(model_chunk)
    with sequence_rope(model_chunk, position_ids):
        return model_chunk(tokens, position_ids, block_causal_mask(layout.segment_ids), **kwargs)


def _check_mask_is_honoured(model_chunk: torch.nn.Module) -> None:
    """The local spec's fused causal softmax kernel (GPU, half precision) ignores a given mask: refuse it, since
    sequences of a row would then attend to each other."""
    from megatron.core.utils import get_model_config
    config = get_model_config(model_chunk)
    if config.masked_softmax_fusion and torch.cuda.is_available() and (config.bf16 or config.fp16):
        raise ValueError("trainer.packing: rows on the local layer spec needs masked_softmax_fusion off (its fused "
                         "causal kernel ignores the block mask); use trainer.packing: thd with Transformer Engine")
