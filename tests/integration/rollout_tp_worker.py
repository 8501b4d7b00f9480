"""torchrun worker for the colocated tensor-parallel vLLM test (not a test module itself).

Each rank: joins the trainer's gloo default group, builds a VllmEngine with tensor_parallel_size=WORLD_SIZE
and distributed_executor_backend="external_launcher", takes greedy outputs and samples, pushes the weights of
`new_weights` (a safetensors file, streamed in several buckets) and takes greedy outputs again, then checks
the trainer's default group still works. Writes its results as JSON to <out_dir>/rank<r>.json.

  torchrun --nproc-per-node 2 rollout_tp_worker.py MODEL_DIR NEW_WEIGHTS OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PROMPTS = [[5, 17, 33, 9, 100], [250, 3], [7, 7, 7, 7, 7, 7, 7, 40]]


def main(model_dir: str, new_weights: str, out_dir: str) -> None:
    from safetensors.torch import load_file

    from megatron_gift.rollout import SamplingConfig, VllmConfig
    from megatron_gift.rollout.vllm_engine import VllmEngine

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = VllmEngine(VllmConfig(model=model_dir, dtype="float32", max_model_len=128, kv_cache_bytes=64 << 20,
                                   tensor_parallel_size=world, distributed_executor_backend="external_launcher",
                                   update_bucket_bytes=80_000))
    out = {"greedy": engine.greedy(PROMPTS, 12)}
    sampled = engine.generate(PROMPTS, 2, SamplingConfig(temperature=0.7, max_new_tokens=8, ignore_eos=True), seed=3)
    out["samples"] = [s.token_ids for g in sampled.samples for s in g]
    out["logprobs"] = [s.logprobs for g in sampled.samples for s in g]
    state = load_file(new_weights)
    engine.update_weights((name, state[name]) for name in json.loads(open(new_weights + ".order").read()))
    out["buckets"] = engine.last_update["buckets"]
    out["sync_path"] = engine.last_update["path"]  # TP = 2: the weight map does not cover it; vLLM's reload
    out["greedy_new"] = engine.greedy(PROMPTS, 12)
    check = torch.tensor([float(rank + 1)])
    dist.all_reduce(check)
    out["allreduce"] = check.item()
    out["world"] = world
    engine.close()
    # The trainer's group must survive the engine's shutdown.
    check = torch.tensor([float(rank + 1)])
    dist.all_reduce(check)
    out["allreduce_after_close"] = check.item()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
