"""The one table of parameter names between Hugging Face decoders and Megatron-Core GPTModel.

Owns: for every supported family (checkpoint/hf_arch.py), which HF tensors make each Megatron
parameter and the transform between them, in both directions:
  - fused QKV: Megatron's linear_qkv holds, per query group g, [q heads of g (heads_per_group*d rows),
    k_g (d rows), v_g (d rows)], so a TP split along dim 0 keeps whole groups on one rank;
  - fused gate/up: linear_fc1 = cat[gate_proj, up_proj] (dim 0);
  - vocabulary padding: embedding / output rows padded with zeros on import, stripped on export;
  - tied embeddings: no output_layer / lm_head tensor;
  - mixture of experts (Qwen3-MoE, Mixtral): router = the HF gate; expert j's linear_fc1 = cat[gate, up]
    (Mixtral: w1, w3), linear_fc2 = down (w2); names use global expert numbers (the EP gather in
    mcore/experts.py turns a rank's local numbers into global ones). In MoE layers the pre-MLP norm is
    not fused in either spec (Megatron's MoE layer has a separate pre_mlp_layernorm).
Names are full-model (unsharded) names with global layer numbers, in two spellings: the local layer spec
(`decoder.layers.0.input_layernorm.weight`) and the Transformer Engine spec, which fuses the norms into
the following linear (`decoder.layers.0.self_attention.linear_qkv.layer_norm_weight`). Export accepts
either spelling; import emits the one asked for. TP sharding is not done here (dist_checkpointing does it).
Pure torch: no megatron import, so the vLLM weight sync and the tests can use it anywhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple

import torch

from megatron_gift.hf.arch import DEFAULT_VOCAB_MULTIPLE, HFArch, parse_hf_config

Tensor = torch.Tensor
# HF tensors that carry no weights (old checkpoints saved rotary caches); skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Entry:
    """One Megatron parameter: its local-spec name, its TE-spec name, the HF names it is built from."""

    mcore: str
    te: str
    hf: Tuple[str, ...]
    kind: str  # "copy" | "router" | "qkv" | "qkv_bias" | "gate_up" | "vocab"
    ffn: int = 0  # MLP width of a gate_up / down entry when it is not arch.ffn_hidden_size (an expert's)


# HF names of the MoE block: family -> (block, router, gate, up, down)
_MOE_HF = {"qwen3_moe": ("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
           "mixtral": ("block_sparse_moe", "gate", "w1", "w3", "w2")}


def expert_mcore_name(layer: int, expert: int, fc: str, te: bool = False) -> str:
    """Full-model name of expert `expert`'s linear_fc1 / linear_fc2 in layer `layer` (local or TE spec)."""
    if te:  # TEGroupedMLP: one weight per expert on the grouped linear
        return f"decoder.layers.{layer}.mlp.experts.{fc}.weight{expert}"
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.{fc}.weight"


def _moe_mlp_entries(arch: HFArch, i: int) -> list[Entry]:
    block, router, gate, up, down = _MOE_HF[arch.model_type]
    hf = f"model.layers.{i}.{block}."
    mc = f"decoder.layers.{i}."
    ffn = arch.moe.ffn_hidden_size
    entries = [
        Entry(f"{mc}pre_mlp_layernorm.weight", f"{mc}pre_mlp_layernorm.weight",
              (f"model.layers.{i}.post_attention_layernorm.weight",), "copy"),
        Entry(f"{mc}mlp.router.weight", f"{mc}mlp.router.weight", (f"{hf}{router}.weight",), "router"),
    ]
    for j in range(arch.moe.num_experts):
        ex = f"{hf}experts.{j}."
        entries.append(Entry(expert_mcore_name(i, j, "linear_fc1"), expert_mcore_name(i, j, "linear_fc1", True),
                             (f"{ex}{gate}.weight", f"{ex}{up}.weight"), "gate_up", ffn))
        entries.append(Entry(expert_mcore_name(i, j, "linear_fc2"), expert_mcore_name(i, j, "linear_fc2", True),
                             (f"{ex}{down}.weight",), "copy", ffn))
    return entries


def _layer_entries(arch: HFArch, i: int) -> list[Entry]:
    hf = f"model.layers.{i}."
    mc = f"decoder.layers.{i}."
    attn = f"{mc}self_attention."
    entries = [
        Entry(f"{mc}input_layernorm.weight", f"{attn}linear_qkv.layer_norm_weight",
              (f"{hf}input_layernorm.weight",), "copy"),
        Entry(f"{attn}linear_qkv.weight", f"{attn}linear_qkv.weight",
              tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
        Entry(f"{attn}linear_proj.weight", f"{attn}linear_proj.weight", (f"{hf}self_attn.o_proj.weight",), "copy"),
    ]
    if arch.moe is not None and arch.moe.is_moe_layer(i):
        entries.extend(_moe_mlp_entries(arch, i))
    else:
        entries.extend([
            Entry(f"{mc}pre_mlp_layernorm.weight", f"{mc}mlp.linear_fc1.layer_norm_weight",
                  (f"{hf}post_attention_layernorm.weight",), "copy"),
            Entry(f"{mc}mlp.linear_fc1.weight", f"{mc}mlp.linear_fc1.weight",
                  (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), "gate_up"),
            Entry(f"{mc}mlp.linear_fc2.weight", f"{mc}mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",), "copy"),
        ])
    if arch.qkv_bias:
        entries.append(Entry(f"{attn}linear_qkv.bias", f"{attn}linear_qkv.bias",
                             tuple(f"{hf}self_attn.{p}_proj.bias" for p in "qkv"), "qkv_bias"))
    if arch.qk_norm:
        for p in "qk":
            name = f"{attn}{p}_layernorm.weight"
            entries.append(Entry(name, name, (f"{hf}self_attn.{p}_norm.weight",), "copy"))
    return entries


def mapping_entries(arch: HFArch) -> list[Entry]:
    """Every Megatron parameter of the full model, in HF checkpoint order (embedding, layers, norm, head)."""
    entries = [Entry("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
                     ("model.embed_tokens.weight",), "vocab")]
    for i in range(arch.num_layers):
        entries.extend(_layer_entries(arch, i))
    entries.append(Entry("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
                         ("model.norm.weight",), "copy"))
    if not arch.tie_embeddings:
        entries.append(Entry("output_layer.weight", "output_layer.weight", ("lm_head.weight",), "vocab"))
    return entries


# ---- transforms (full tensors; shapes in the comments use d = head_dim, G = kv groups, R = heads per group)

def fuse_qkv(arch: HFArch, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q [G*R*d, ...], k/v [G*d, ...] -> linear_qkv [G*(R+2)*d, ...] grouped per query group."""
    g, d = arch.num_kv_heads, arch.head_dim
    tail = q.shape[1:]
    parts = (q.reshape(g, arch.heads_per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail))
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(arch: HFArch, qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv."""
    g, d, r = arch.num_kv_heads, arch.head_dim, arch.heads_per_group
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (r + 2) * d, *tail)
    q, k, v = torch.split(grouped, [r * d, d, d], dim=1)
    return tuple(t.reshape(-1, *tail) for t in (q, k, v))  # type: ignore[return-value]


def pad_vocab(t: Tensor, padded_rows: int) -> Tensor:
    """[V, h] -> [padded_rows, h] with zero rows (the padded logits are masked out by the trainer)."""
    if padded_rows == t.shape[0]:
        return t
    return torch.cat([t, t.new_zeros(padded_rows - t.shape[0], *t.shape[1:])], dim=0)


def _check_shape(name: str, t: Tensor, expected: Tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"tensor {name!r}: shape {tuple(t.shape)} does not match the config's {tuple(expected)}")


def _expected_hf_shapes(arch: HFArch, e: Entry) -> list[Tuple[int, ...]]:
    h, d = arch.hidden_size, arch.head_dim
    if e.kind == "qkv":
        return [(arch.num_heads * d, h), (arch.num_kv_heads * d, h), (arch.num_kv_heads * d, h)]
    if e.kind == "qkv_bias":
        return [(arch.num_heads * d,), (arch.num_kv_heads * d,), (arch.num_kv_heads * d,)]
    if e.kind == "gate_up":
        return [(e.ffn or arch.ffn_hidden_size, h)] * 2
    if e.kind == "vocab":
        return [(arch.vocab_size, h)]
    if e.kind == "router":
        return [(arch.moe.num_experts, h)]
    if e.hf[0].endswith("o_proj.weight"):
        return [(h, arch.num_heads * d)]
    if e.ffn or e.hf[0].endswith("down_proj.weight"):
        return [(h, e.ffn or arch.ffn_hidden_size)]
    if e.hf[0].endswith("_norm.weight") and ".self_attn." in e.hf[0]:
        return [(d,)]
    return [(h,)]


def _check_mcore_shape(arch: HFArch, e: Entry, t: Tensor) -> None:
    hf_shapes = _expected_hf_shapes(arch, e)
    if e.kind == "vocab":  # any padding is accepted; the rows past vocab_size are dropped
        ok = t.dim() == 2 and t.shape[0] >= arch.vocab_size and t.shape[1] == arch.hidden_size
        expected = f"({arch.vocab_size}+padding, {arch.hidden_size})"
    else:
        rows = sum(s[0] for s in hf_shapes) if e.kind not in ("copy", "router") else hf_shapes[0][0]
        expected_shape = (rows, *hf_shapes[0][1:])
        ok, expected = tuple(t.shape) == expected_shape, str(expected_shape)
    if not ok:
        raise ValueError(f"Megatron tensor {e.mcore!r}: shape {tuple(t.shape)} does not match the config's {expected}")


def to_mcore(arch: HFArch, e: Entry, hf_tensors: list[Tensor], vocab_multiple: int) -> Tensor:
    """HF tensors of one entry -> the full Megatron tensor (shapes checked, naming the HF tensor)."""
    for name, t, shape in zip(e.hf, hf_tensors, _expected_hf_shapes(arch, e)):
        _check_shape(name, t, shape)
    if e.kind in ("qkv", "qkv_bias"):
        return fuse_qkv(arch, *hf_tensors)
    if e.kind == "gate_up":
        return torch.cat(hf_tensors, dim=0)
    if e.kind == "vocab":
        return pad_vocab(hf_tensors[0], arch.padded_vocab_size(vocab_multiple))
    return hf_tensors[0]


def to_hf(arch: HFArch, e: Entry, t: Tensor) -> Tuple[Tensor, ...]:
    """Full Megatron tensor of one entry -> its HF tensors (views where possible; callers copy if needed)."""
    _check_mcore_shape(arch, e, t)
    if e.kind in ("qkv", "qkv_bias"):
        out = split_qkv(arch, t)
    elif e.kind == "gate_up":
        out = tuple(torch.chunk(t, 2, dim=0))
    elif e.kind == "vocab":
        out = (t[: arch.vocab_size],)
    else:
        out = (t,)
    for name, x, shape in zip(e.hf, out, _expected_hf_shapes(arch, e)):
        _check_shape(f"{name} (from {e.mcore})", x, shape)
    return out


# ---- streaming front ends

def hf_to_mcore_tensors(
    arch: HFArch,
    get_hf: Callable[[str], Tensor],
    *,
    te_spec: bool = False,
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
) -> Iterator[Tuple[str, Tensor]]:
    """Yield (megatron_name, full tensor) one parameter at a time; `get_hf(name)` loads one HF tensor."""
    for e in mapping_entries(arch):
        yield (e.te if te_spec else e.mcore), to_mcore(arch, e, [get_hf(n) for n in e.hf], vocab_multiple)


def required_hf_names(arch: HFArch) -> list[str]:
    return [n for e in mapping_entries(arch) for n in e.hf]


def unexpected_hf_names(arch: HFArch, names: Iterable[str]) -> list[str]:
    """HF tensor names the table would not consume (a checkpoint of another model, or a lm_head when tied)."""
    wanted = set(required_hf_names(arch))
    return sorted(n for n in names if n not in wanted and not n.endswith(IGNORED_HF_SUFFIXES))


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _shift_layer(name: str, offset: int) -> str:
    m = _LAYER_RE.match(name)
    return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if (m and offset) else name


def mcore_to_hf_tensors(
    hf_config: Any,
    named_params: Iterable[Tuple[str, Tensor]],
    *,
    layer_offset: int = 0,
    arch: Optional[HFArch] = None,
) -> Iterator[Tuple[str, Tensor]]:
    """Stream full (TP-gathered) Megatron parameters as (hf_name, tensor); both spec spellings are accepted.

    `layer_offset` turns a pipeline stage's local layer numbers into global ones. A tied output_layer
    (present on the last PP stage as a copy of the embedding) is skipped; `_extra_state` entries are
    skipped; any other unknown name is an error naming it.
    """
    arch = arch or parse_hf_config(hf_config)
    by_name: dict[str, Entry] = {}
    for e in mapping_entries(arch):
        by_name[e.mcore] = by_name[e.te] = e
    for raw_name, t in named_params:
        name = _shift_layer(raw_name.removeprefix("module."), layer_offset)
        if name.endswith("_extra_state") or (arch.tie_embeddings and name == "output_layer.weight"):
            continue
        e = by_name.get(name)
        if e is None:
            raise KeyError(f"Megatron tensor {raw_name!r} (global name {name!r}) has no HF mapping for {arch.model_type}")
        yield from zip(e.hf, to_hf(arch, e, t))
