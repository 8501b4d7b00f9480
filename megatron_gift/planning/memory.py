"""Per-GPU memory estimate of a GIFT training step (policy, reference, activations) next to a vLLM engine.

Owns the formulas (bytes; h hidden, q = heads*head_dim, k = kv_heads*head_dim, f ffn, a heads, t TP,
c CP, s sequence length, b sequences per microbatch, d the parameter dtype's bytes):
- weights       d * P_stage (model_size.stage_params: TP shards + replicated norms);
- main grads    4 * P_stage (the DDP buffer reduces in fp32: mcore/training.py grad_reduce_in_fp32=True);
- optimizer     (12 if d < 4 else 8) * P_stage: fp32 master copy + Adam's two moments (no master copy
                in fp32 runs), divided by DP*CP under the distributed optimizer (Megatron shards it over
                the data-parallel group with context parallelism);
- reference     d * P_stage when the loss anchors to (or regularises towards) the frozen reference;
- activations   per decoder layer and token on this rank (Korthikanti et al. 2022, "Reducing
                Activation Recomputation", counted for this project's Llama layer: RMSNorm, GQA, SwiGLU
                computed unfused, dropout 0):
                  d * (R / (t if sequence_parallel else 1) + T / t) bytes, tokens = b * s / c,
                  te    (Transformer Engine spec, flash / fused attention): R = 4h (two norms' input and
                        output), T = 2q + 2k + 5f (q, k, v, attention output; gate+up output, SiLU output,
                        up half, down-projection input);
                  local (Megatron's local spec with the SDPA core attention, what runs without TE):
                        R = 6h (torch RMSNorm keeps its input and normalised input, the linear its input),
                        T = 3q + 3k + a + 5f (the fused q/k/v output, roped q and k, the attention output,
                        fp32 log-sum-exp per head; no s^2 probabilities) -- checked against saved-tensor
                        bytes on CPU in tests/unit/test_dry_run.py;
                times the layers of the microbatches in flight: 1F1B keeps min(m, pp - stage) stage
                microbatches; the interleaved schedule min(m*v, 2(pp-stage-1) + (v-1)pp + 1) chunks of
                L/(pp*v) layers (m microbatches, v virtual stages). recompute='full' (parallel.recompute)
                keeps only each layer's input (d * h / t_sp per token)
                plus one layer's activations of one microbatch;
- logits        last stage: tokens * V_pad/t * (d + 8): the logits, the fp32 working copy kept as the
                softmax for backward (mcore/logprobs.py) and its fp32 gradient;
- vLLM share    gpu_memory_utilization * GPU memory (or weights + kv_cache_bytes + overhead when
                kv_cache_bytes is set), resident during training unless the engine sleeps there
                (rollout.engine.enable_sleep_mode, on by default on GPUs): asleep it keeps only its overhead
                (weights offloaded to host at level 1, dropped at level 2; KV cache freed), and the step's
                peak is then max(training + asleep engine, static training state + awake engine);
- reserve       CUDA context, NCCL buffers, allocator fragmentation (a flat assumption).
Mixture-of-experts models: weights / grads / optimizer count this rank's E/ep experts (split over expert
TP; the distributed optimizer shards expert state over the expert data-parallel group, world/(ep*etp*pp));
activations use the active width (top_k experts' f per token, model_size.active_ffn_width) plus the
dispatcher's permuted copies of the k routed token copies (2 k h per token).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_gift.hf.arch import HFArch
from megatron_gift.planning.model_size import active_ffn_width, stage_params, total_params

GIB = 1 << 30
ATTENTION = ("te", "local")
RECOMPUTE = ("none", "selective", "full")
VLLM_OVERHEAD_BYTES = 2 * GIB  # CUDA graphs + the profile run's activations inside vLLM's share (assumed)


@dataclass(frozen=True)
class TrainPlan:
    """Everything the estimate needs, already validated by layout.py."""

    arch: HFArch
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: Optional[int]
    sequence_parallel: bool
    distributed_optimizer: bool
    dtype_bytes: int
    microbatches: int  # per rank per optimizer step
    seqs_per_microbatch: int
    seq_len: int
    vocab_multiple: int
    reference_copy: bool
    attention: str = "te"
    recompute: str = "none"
    ep: int = 1
    etp: int = 1

    @property
    def tokens_per_microbatch(self) -> int:
        """Tokens of one microbatch on one rank (the sequence is split over CP)."""
        return self.seqs_per_microbatch * self.seq_len // self.cp


@dataclass
class Item:
    name: str
    bytes: float
    formula: str


@dataclass
class StageEstimate:
    stage: int
    items: List[Item] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(i.bytes for i in self.items)

    def get(self, name: str) -> float:
        return next(i.bytes for i in self.items if i.name == name)


def layer_activation_bytes_per_token(plan: TrainPlan) -> float:
    """Saved activations of one decoder layer per token on one rank."""
    a = plan.arch
    h, f = a.hidden_size, active_ffn_width(a)
    q, k = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    if plan.attention == "te":
        replicated, sharded = 4 * h, 2 * q + 2 * k + 5 * f
    else:  # the log-sum-exp is fp32 per head: a * 4 bytes, written in units of dtype_bytes
        replicated, sharded = 6 * h, 3 * q + 3 * k + 5 * f + a.num_heads * 4 / plan.dtype_bytes
    if a.moe is not None:
        replicated += 2 * a.moe.top_k * h  # the dispatcher's permuted token copies (in and out)
    return plan.dtype_bytes * (replicated / (plan.tp if plan.sequence_parallel else 1) + sharded / plan.tp)


def in_flight(plan: TrainPlan, stage: int) -> tuple[int, int]:
    """(model-chunk microbatches whose activations stage `stage` holds at its peak, layers per chunk)."""
    m, pp, layers = plan.microbatches, plan.pp, plan.arch.num_layers
    if plan.vpp is None:
        return min(m, pp - stage), layers // pp
    chunks = m * plan.vpp
    warmup = min(chunks, 2 * (pp - stage - 1) + (plan.vpp - 1) * pp)
    return min(chunks, warmup + 1), layers // (pp * plan.vpp)


def activation_bytes(plan: TrainPlan, stage: int) -> tuple[float, str]:
    units, per_unit = in_flight(plan, stage)
    tokens = plan.tokens_per_microbatch
    layer = tokens * layer_activation_bytes_per_token(plan)
    where = f"{units} x {per_unit} layers x {tokens} tokens"
    if plan.recompute == "none":
        return units * per_unit * layer, where
    if plan.recompute == "selective":  # the attention core is recomputed (local spec: it saves nothing more)
        return units * per_unit * layer, f"{where}, attention core recomputed (selective)"
    kept = plan.dtype_bytes * plan.arch.hidden_size / (plan.tp if plan.sequence_parallel else 1) * tokens
    return units * per_unit * kept + layer, f"{where}, layer inputs + 1 layer (full recompute)"


def logits_bytes(plan: TrainPlan) -> float:
    vocab = plan.arch.padded_vocab_size(plan.vocab_multiple) // plan.tp
    return plan.tokens_per_microbatch * vocab * (plan.dtype_bytes + 8.0)


def estimate_stage(plan: TrainPlan, stage: int) -> StageEstimate:
    """Training-side items on one GPU of pipeline stage `stage`."""
    sp = stage_params(plan.arch, plan.tp, plan.pp, stage, plan.vocab_multiple, plan.ep, plan.etp)
    params = sp.total
    d = plan.dtype_bytes
    opt_per_param = 12 if d < 4 else 8
    shards = plan.dp * plan.cp if plan.distributed_optimizer else 1
    # Expert state is sharded over the expert data-parallel group: world / (ep * etp * pp) = tp*cp*dp / (ep*etp).
    expert_shards = plan.tp * plan.cp * plan.dp // (plan.ep * plan.etp) if plan.distributed_optimizer else 1
    est = StageEstimate(stage)
    est.items.append(Item("weights", d * params, f"{params / 1e9:.3f}B params x {d} B"))
    est.items.append(Item("main grads (fp32)", 4.0 * params, "4 B/param"))
    optimizer = opt_per_param * ((params - sp.experts) / shards + sp.experts / expert_shards)
    formula = f"{opt_per_param} B/param / {shards}" + (" (distributed)" if shards > 1 else "")
    if sp.experts:
        formula += f", experts ({sp.experts / 1e9:.3f}B) / {expert_shards}"
    est.items.append(Item("optimizer state", optimizer, formula))
    if plan.reference_copy:
        est.items.append(Item("reference model", d * params, "frozen copy of the stage"))
    act, where = activation_bytes(plan, stage)
    est.items.append(Item("activations", act, where))
    if stage == plan.pp - 1:
        est.items.append(Item("logits + log-softmax", logits_bytes(plan),
                              f"{plan.tokens_per_microbatch} tokens x V/{plan.tp} x {d + 8} B"))
    return est


@dataclass(frozen=True)
class VllmPlan:
    tensor_parallel_size: int
    dtype_bytes: int
    gpu_memory_utilization: float
    kv_cache_bytes: Optional[int]
    max_model_len: int
    sleeps: bool = False  # the trainer puts the engine to sleep for the train phase


@dataclass
class VllmEstimate:
    share: float  # bytes the engine holds on each of its GPUs
    weights: float
    kv_cache: float
    kv_bytes_per_token: float
    full_sequences: float  # max_model_len sequences the KV cache holds at once
    asleep: Optional[float] = None  # bytes left on each GPU while the engine sleeps (None: it never sleeps)

    @property
    def during_training(self) -> float:
        return self.share if self.asleep is None else self.asleep


def estimate_vllm(arch: HFArch, vocab_multiple: int, v: VllmPlan, gpu_bytes: float) -> VllmEstimate:
    """The engine's memory on each of its GPUs: weights / vLLM TP and what is left for the KV cache."""
    t = v.tensor_parallel_size
    weights = total_params(arch, vocab_multiple) * v.dtype_bytes / t
    kv_heads = max(arch.num_kv_heads // t, 1)  # vLLM replicates KV heads when t > kv_heads
    per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * v.dtype_bytes
    if v.kv_cache_bytes is not None:
        kv = float(v.kv_cache_bytes)
        share = weights + kv + VLLM_OVERHEAD_BYTES
    else:
        share = v.gpu_memory_utilization * gpu_bytes
        kv = max(share - weights - VLLM_OVERHEAD_BYTES, 0.0)
    return VllmEstimate(share=share, weights=weights, kv_cache=kv, kv_bytes_per_token=per_token,
                        full_sequences=kv / (per_token * v.max_model_len),
                        asleep=min(VLLM_OVERHEAD_BYTES, share) if v.sleeps else None)


STATIC_ITEMS = ("weights", "main grads (fp32)", "optimizer state", "reference model")


def static_bytes(stage: StageEstimate) -> float:
    """What training keeps on the GPU between train phases (while the engine generates)."""
    return sum(i.bytes for i in stage.items if i.name in STATIC_ITEMS)
