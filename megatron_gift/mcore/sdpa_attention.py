"""Core attention of the local layer spec through torch's scaled_dot_product_attention (CPU, and GPU without TE).

Owns `SdpaDotProductAttention`, a drop-in for Megatron's `DotProductAttention` (same constructor, same
[s, b, h] in / out): instead of materialising the scores with baddbmm, a masked softmax and a bmm over
[s, b] layout copies, it calls torch's fused SDPA kernel (flash attention on CPU), which never builds the
[b, h, s, s] probabilities in the backward pass either. Two inputs:
- bshd (padded or "rows"-packed microbatches): the same mask semantics as Megatron (True = not attended;
  no mask = causal), grouped-query heads handled by the kernel;
- thd (`PackedSeqParams(qkv_format="thd")`, `trainer.packing: thd`): one row of sequences back to back,
  each attended causally on its own (a loop over cu_seqlens_padded), so packing costs no attention across
  or beyond sequence boundaries, as with Transformer Engine's THD attention on GPU.
Whatever the kernel cannot express exactly (dropout while training, a softmax offset, sliding windows,
an attention bias) falls back to Megatron's own unfused path; thd with any of those is refused.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SdpaDotProductAttention(DotProductAttention):
    """Megatron's DotProductAttention with the score / softmax / context part done by torch SDPA."""

    def _sdpa_exact(self, attention_bias) -> Optional[str]:
        """Why SDPA would not compute exactly what the unfused path computes here (None: it would)."""
        if attention_bias is not None:
            return "an attention bias"
        if self.softmax_offset is not None:
            return f"softmax_type {self.config.softmax_type!r}"
        if getattr(self.scale_mask_softmax, "window_size", None) is not None:
            return "sliding-window attention"
        if self.training and self.attention_dropout.p > 0:
            return "attention dropout"
        return None

    @property
    def _scale(self) -> float:
        """The logit scale of the unfused path: softmax_scale times the layer-scaling coefficient it divided out."""
        coeff = self.scale_mask_softmax.scale
        return self.softmax_scale * (coeff if coeff is not None else 1.0)

    @property
    def _gqa(self) -> bool:
        return self.num_attention_heads_per_partition != self.num_query_groups_per_partition

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """[sq, b, np, hn] (bshd) or [t, np, hn] (thd) -> [sq, b, np * hn] / [t, np * hn]."""
        why_not = self._sdpa_exact(attention_bias)
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r} are not supported "
                                 "by the local attention; use trainer.packing: thd or rows")
            if why_not:
                raise ValueError(f"trainer.packing: thd on the local layer spec cannot run with {why_not}; "
                                 "use trainer.packing: rows")
            return self._thd(query, key, value, packed_seq_params)
        if why_not:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        return self._bshd(query, key, value, attention_mask)

    def _bshd(self, query, key, value, attention_mask):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale, enable_gqa=self._gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self._scale,
                                                 enable_gqa=self._gqa)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _thd(self, query, key, value, params):
        """Each sequence's span (padded boundaries: what the row holds) attended causally on its own."""
        bounds = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        sizes = _sizes(bounds, query.shape[0])
        # [1, heads, t, hn] (4-d: the flash kernel), split (one cat in the backward, not a zero-fill per slice)
        pieces = zip(*((x.transpose(0, 1).unsqueeze(0).split(sizes, dim=2)) for x in (query, key, value)))
        outs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale, enable_gqa=self._gqa)
                for q, k, v in pieces if q.shape[2]]
        return torch.cat(outs, dim=2)[0].transpose(0, 1).reshape(query.shape[0], self.hidden_size_per_partition)


def _sizes(cu_seqlens: torch.Tensor, total: int) -> List[int]:
    """Span of every sequence from cu_seqlens (a host copy: the layout is built on host); they must tile the row."""
    b = cu_seqlens.tolist()
    if b[0] != 0 or b[-1] != total:
        raise ValueError(f"thd row of {total} tokens does not match cu_seqlens {b[0]}..{b[-1]}")
    return [e - s for s, e in zip(b[:-1], b[1:])]
