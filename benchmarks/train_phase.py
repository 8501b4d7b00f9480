"""Train-phase cost of GIFT against a plain Megatron LM step on the same model and packed tokens.

Times, interleaved and on the same model and microbatches:
  lm     -- Megatron fwd/bwd with a masked token cross-entropy (vocab-parallel), the baseline;
  gift   -- GiftSchedule.forward_backward: vocab-parallel log-probs, GIFT loss, backward;
  anchor -- the forward-only anchor log-prob pass (GiftSchedule.compute_logprobs).
Prints medians and the ratios gift/lm (target <= 1.05) and anchor/lm. On a GPU it also prints the
achieved model TFLOP/s (6 * params * tokens for fwd+bwd, 2 * params * tokens for forward only,
attention FLOPs excluded).

  python benchmarks/train_phase.py                  # CPU: tiny model, gloo, compatibility layer
  python benchmarks/train_phase.py --preset 1b      # GPU: ~1B-parameter model, bf16, NCCL
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {  # hidden, layers, heads, kv groups, ffn, vocab, groups, group size, prompt, response
    "tiny": dict(hidden=128, layers=4, heads=4, kv=2, ffn=352, vocab=512, groups=2, size=4, prompt=32, response=96),
    "small": dict(hidden=512, layers=8, heads=8, kv=4, ffn=1408, vocab=8192, groups=2, size=4, prompt=64, response=192),
    "1b": dict(hidden=2048, layers=16, heads=16, kv=8, ffn=5632, vocab=32000, groups=2, size=8, prompt=256, response=768),
}


def _setup(cuda: bool):
    """World of one rank: NCCL on a GPU, gloo + the CPU compatibility layer otherwise."""
    from megatron_gift.mcore.parallel import initialize_parallel
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    stack = contextlib.ExitStack()
    if not cuda:
        from megatron_gift.mcore.cpu_compat import enable_cpu_compat
        stack.enter_context(enable_cpu_compat())
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    initialize_parallel(seed=1234)
    return stack


def _model(p, cuda: bool, attention: str = "sdpa", gemm: str = "onednn"):
    """attention: "unfused" (Megatron's local DotProductAttention) or "sdpa" (the trainer's local spec).
    gemm: "onednn" (the trainer's CPU float32 linears, mcore/onednn_linear.py; nothing on GPU) or "torch"
    (torch.matmul: MKL on CPU, cuBLAS on GPU)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    import torch.nn.functional as F

    from megatron_gift.mcore.model import sdpa_core_attention
    dtype = torch.bfloat16 if cuda else torch.float32
    config = TransformerConfig(
        num_layers=p["layers"], hidden_size=p["hidden"], num_attention_heads=p["heads"], num_query_groups=p["kv"],
        ffn_hidden_size=p["ffn"], gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=not cuda,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=cuda, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, calculate_per_token_loss=True)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    model = GPTModel(config=config, transformer_layer_spec=sdpa_core_attention(spec) if attention == "sdpa" else spec,
                     vocab_size=p["vocab"], max_sequence_length=p["prompt"] + p["response"], position_embedding_type="rope")
    if gemm == "onednn" and not cuda:
        from megatron_gift.mcore.onednn_linear import use_onednn_linears
        use_onednn_linears(model)
    return model.cuda() if cuda else model


def _groups(p):
    from megatron_gift.algo.packing import RolloutGroup
    g = torch.Generator().manual_seed(0)
    out = []
    for gid in range(p["groups"]):
        prompt = torch.randint(0, p["vocab"], (p["prompt"],), generator=g)
        responses = [torch.randint(0, p["vocab"], (p["response"] - int(torch.randint(0, 16, (1,), generator=g)),),
                                   generator=g) for _ in range(p["size"])]
        out.append(RolloutGroup(gid, prompt, responses, torch.rand(p["size"], generator=g)))
    return out


def _lm_step(ddp, mbs, vocab):
    """Baseline: Megatron fwd/bwd of a masked mean token cross-entropy, same schedule and grad finalisation."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def forward_step(it, model):
        mb = next(it)
        out = model(mb.tokens, mb.position_ids, None)

        def loss_func(logits):
            ce = vocab_parallel_cross_entropy(logits.float().clone(), mb.targets)
            mask = mb.loss_inputs.mask
            return (ce * mask).sum(), mask.sum().to(torch.int), {}
        return out, loss_func

    for chunk in ddp:
        chunk.zero_grad_buffer()
    b, s = mbs[0].shape
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(mbs), model=ddp[0],
                                num_microbatches=len(mbs), seq_length=s, micro_batch_size=b)


def _timed(fn, cuda):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--microbatches", type=int, default=2)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    p = PRESETS[args.preset or ("1b" if cuda else "tiny")]
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    with _setup(cuda):
        from megatron.core.process_groups_config import ProcessGroupCollection

        from megatron_gift.algo import build_loss
        from megatron_gift.algo.packing import pack_microbatches
        from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
        from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

        model = _model(p, cuda)
        n_params = sum(x.numel() for x in model.parameters())
        settings = OptimSettings(bf16=cuda)
        ddp = wrap_for_training([model], settings)
        build_optimizer(ddp, settings)
        device = torch.device("cuda" if cuda else "cpu")
        mbs = [mb.to(device) for mb in pack_microbatches(_groups(p), num_microbatches=args.microbatches,
                                                           uniform_length=True)]
        for mb in mbs:  # synthetic anchor so h has a spread (the anchor pass is timed separately)
            mb.loss_inputs.anchor_logprobs = -torch.rand_like(mb.loss_inputs.mask) * mb.loss_inputs.mask
        pg = ProcessGroupCollection.use_mpu_process_groups()
        schedule = GiftSchedule(ddp, build_loss("gift"), ScheduleSettings(vocab_size=p["vocab"]), pg)
        runs = {"lm": lambda: _lm_step(ddp, mbs, p["vocab"]), "gift": lambda: schedule.forward_backward(mbs),
                "anchor": lambda: schedule.compute_logprobs(ddp, mbs)}
        for fn in runs.values():  # warm-up
            fn()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                times[k].append(_timed(fn, cuda))
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = sum(mb.shape[0] * mb.shape[1] for mb in mbs)
        print(f"device: {'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}, params {n_params / 1e6:.1f}M, "
              f"{tokens} tokens/step in {len(mbs)} microbatches, {args.repeats} interleaved repeats")
        for k in runs:
            extra = ""
            if cuda:
                flops = (2 if k == "anchor" else 6) * n_params * tokens
                extra = f"  {flops / med[k] / 1e12:.1f} TFLOP/s"
            print(f"  {k:7s} median {med[k] * 1e3:9.2f} ms{extra}")
        print(f"ratio gift/lm fwd-bwd: {med['gift'] / med['lm']:.3f} (target <= 1.05)")
        print(f"ratio anchor fwd-only / gift fwd-bwd: {med['anchor'] / med['gift']:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
