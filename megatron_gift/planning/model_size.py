"""Parameter counts of a Llama-family decoder (HFArch) as Megatron lays it out over TP and PP (and, for
mixture-of-experts models, the routed experts over EP x expert-TP; the router is replicated).

Owns the arithmetic only: how many parameters one GPU holds for a pipeline stage at a tensor-parallel
size, counted the way Megatron's GPTModel shards them (column / row parallel linears and the
vocab-parallel embedding and output layer split over TP; norms replicated; the padded vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_gift.hf.arch import HFArch


@dataclass(frozen=True)
class StageParams:
    """Parameters on one GPU of one pipeline stage (TP rank's shard)."""

    layers: int  # decoder layers on this stage (all virtual chunks together)
    decoder: int
    embedding: int
    output: int
    experts: int = 0  # the routed experts' part of `decoder` (sharded over the expert data-parallel group)

    @property
    def total(self) -> int:
        return self.decoder + self.embedding + self.output


def layer_params(arch: HFArch, tp: int = 1, ep: int = 1, etp: int = 1, index: int = 0) -> int:
    """Decoder layer `index` on one rank: QKV, attention output (split over TP), two RMSNorms, and either the
    dense gate+up, down (split over TP) or, in an MoE layer, E/ep experts' gate+up, down (split over etp)
    plus the replicated router."""
    q = arch.num_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    h, f = arch.hidden_size, arch.ffn_hidden_size
    sharded = h * (q + 2 * kv) + q * h
    experts = 0
    if arch.moe is not None and arch.moe.is_moe_layer(index):
        experts = (arch.moe.num_experts // ep) * 3 * h * arch.moe.ffn_hidden_size // etp + arch.moe.num_experts * h
    else:
        sharded += h * 2 * f + f * h
    if arch.qkv_bias:
        sharded += q + 2 * kv
    replicated = 2 * h + (2 * arch.head_dim if arch.qk_norm else 0)
    return sharded // tp + replicated + experts


def total_params(arch: HFArch, vocab_multiple: int) -> int:
    """The whole model at TP = 1 with Megatron's padded vocabulary (one output layer unless tied)."""
    vocab = arch.padded_vocab_size(vocab_multiple) * arch.hidden_size
    decoder = sum(layer_params(arch, index=i) for i in range(arch.num_layers))
    return decoder + arch.hidden_size + vocab * (1 if arch.tie_embeddings else 2)


def active_ffn_width(arch: HFArch) -> float:
    """MLP width a token passes through, averaged over layers (an MoE layer: top_k experts' widths)."""
    if arch.moe is None:
        return float(arch.ffn_hidden_size)
    widths = [arch.moe.top_k * arch.moe.ffn_hidden_size if arch.moe.is_moe_layer(i) else arch.ffn_hidden_size
              for i in range(arch.num_layers)]
    return sum(widths) / len(widths)


def stage_params(arch: HFArch, tp: int, pp: int, stage: int, vocab_multiple: int, ep: int = 1,
                 etp: int = 1) -> StageParams:
    """What one GPU of pipeline stage `stage` (0-based) holds. With tied embeddings and pp > 1 the last
    stage keeps its own copy of the output layer (Megatron synchronises it with the embedding)."""
    layers = arch.num_layers // pp
    vocab_shard = arch.padded_vocab_size(vocab_multiple) // tp * arch.hidden_size
    first, last = stage == 0, stage == pp - 1
    embedding = vocab_shard if first else 0
    output = 0
    if last:
        output = arch.hidden_size  # final norm
        if not arch.tie_embeddings or pp > 1:
            output += vocab_shard
    stage_layers = range(stage * layers, (stage + 1) * layers)
    decoder = sum(layer_params(arch, tp, ep, etp, i) for i in stage_layers)
    experts = 0
    if arch.moe is not None:
        per_layer = (arch.moe.num_experts // ep) * 3 * arch.hidden_size * arch.moe.ffn_hidden_size // etp
        experts = per_layer * sum(arch.moe.is_moe_layer(i) for i in stage_layers)
    return StageParams(layers=layers, decoder=decoder, embedding=embedding, output=output, experts=experts)
