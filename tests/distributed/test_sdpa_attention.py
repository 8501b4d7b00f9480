"""SdpaDotProductAttention (mcore/sdpa_attention.py) against Megatron's own unfused DotProductAttention.

float64, one rank: outputs and input gradients equal to 1e-10 for causal padded rows, a block-diagonal mask
(packed rows), grouped-query heads and query-key layer scaling; THD (one row of sequences, cu_seqlens padded)
equals the unfused attention run on each sequence alone. Dropout while training falls back to the unfused
path (bitwise its output under the same seed); THD with dropout is refused.
"""
from __future__ import annotations

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed

TOL = dict(atol=1e-10, rtol=1e-10)


def _pair(heads=4, groups=2, layer_number=3, **extra):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_gift.mcore.sdpa_attention import SdpaDotProductAttention
    config = TransformerConfig(num_layers=4, hidden_size=16 * heads, num_attention_heads=heads,
                               num_query_groups=groups, use_cpu_initialization=True,
                               **{"attention_dropout": 0.0, **extra})
    return tuple(cls(config, layer_number, AttnMaskType.causal, "self") for cls in
                 (DotProductAttention, SdpaDotProductAttention))


def _qkv(shape_q, shape_kv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in (shape_q, shape_kv, shape_kv)]


def _run(module, q, k, v, mask=None, **kw):
    out = module(q, k, v, mask, **kw)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                (q, k, v))
    return out.detach(), grads


def _case_bshd(rank, world_size):
    from megatron_gift.algo.seq_packing import block_causal_mask
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1], [3, 3, 3, 3, 3, 3, 4, 4, -1, -1]])
    checked = []
    for heads, groups, extra in ((4, 4, {}), (4, 2, {}), (4, 1, {"apply_query_key_layer_scaling": True})):
        unfused, sdpa = _pair(heads, groups, **extra)
        q, k, v = _qkv((10, 2, heads, 16), (10, 2, groups, 16))
        for mask in (None, block_causal_mask(seg)):
            ref, got = _run(unfused, q, k, v, mask), _run(sdpa, q, k, v, mask)
            torch.testing.assert_close(got[0], ref[0], **TOL)
            for a, b in zip(got[1], ref[1]):
                torch.testing.assert_close(a, b, **TOL)
            checked.append(float(ref[0].abs().max()))
    return checked


def _case_thd(rank, world_size):
    from megatron.core.packed_seq_params import PackedSeqParams
    unfused, sdpa = _pair(4, 2)
    lengths, padded = [5, 3, 8], [8, 4, 8]
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    cu_pad = torch.tensor([0] + padded).cumsum(0).int()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                             cu_seqlens_kv_padded=cu_pad, max_seqlen_q=8, max_seqlen_kv=8)
    t = sum(padded)
    q, k, v = _qkv((t, 4, 16), (t, 2, 16), seed=1)
    out, grads = _run(sdpa, q, k, v, packed_seq_params=params)
    outs, refs = [], []
    for s, e in zip(cu_pad[:-1].tolist(), cu_pad[1:].tolist()):
        piece = [x[s:e].detach().unsqueeze(1).requires_grad_() for x in (q, k, v)]
        o = unfused(*piece, None)
        outs.append(o.squeeze(1))
        refs.append(piece)
    ref = torch.cat(outs)
    torch.testing.assert_close(out, ref.detach(), **TOL)
    ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).view_as(ref)).sum(),
                                    [x for piece in refs for x in piece])
    for i, g in enumerate(grads):  # q, k, v: the pieces' gradients back to back
        torch.testing.assert_close(g, torch.cat([ref_grads[3 * j + i].squeeze(1) for j in range(len(refs))]), **TOL)
    return float(ref.abs().max())


def _case_dropout(rank, world_size):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    unfused, sdpa = _pair(4, 4, attention_dropout=0.5)
    q, k, v = _qkv((6, 1, 4, 16), (6, 1, 4, 16))
    outs = []
    for module in (unfused, sdpa):
        torch.manual_seed(7)
        get_cuda_rng_tracker().reset()
        get_cuda_rng_tracker().add("model-parallel-rng", 11)
        outs.append(module(q, k, v, None))
    sdpa.eval()
    without = sdpa(q, k, v, None)  # eval: no dropout, the SDPA kernel
    sdpa.train()
    cu = torch.tensor([0, 6], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    try:
        sdpa(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=params)
        refused = None
    except ValueError as e:
        refused = str(e)
    return torch.equal(outs[0], outs[1]), float((outs[0] - without).abs().max()), refused


@pytest.mark.distributed
def test_bshd_equals_unfused_causal_masked_gqa_scaled():
    peaks = run_distributed(_case_bshd, 1)[0]
    assert len(peaks) == 6 and min(peaks) > 0.1


@pytest.mark.distributed
def test_thd_equals_unfused_per_sequence():
    assert run_distributed(_case_thd, 1)[0] > 0.1


@pytest.mark.distributed
def test_dropout_falls_back_to_unfused_and_thd_refuses_it():
    same, dropped, refused = run_distributed(_case_dropout, 1)[0]
    assert same and dropped > 0.1  # both took the unfused path, and its dropout really dropped (p = 0.5)
    assert refused and "attention dropout" in refused and "trainer.packing: rows" in refused
