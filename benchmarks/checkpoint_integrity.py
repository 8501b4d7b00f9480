"""Cost of the checkpoint content checksums as a ratio of the save they protect.

    python benchmarks/checkpoint_integrity.py [--hidden 1024 --layers 8 --vocab 32000] [--runs 3]

One process builds a Llama-style GPTModel (float32), wraps it for training, takes one Adam step (so the
optimizer state exists) and then, per run: saves model + optimizer exactly as the trainer does
(mcore/dist_ckpt.save_training_state, synchronous) and checksums every written file as the checkpoint commit
does (checkpoint/integrity.py, one rank hashing all files: the worst case; with N ranks each hashes ~1/N).
Prints the checkpoint size, the medians of the save and hashing times, their ratio, and the hashing rate.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(rank, world_size, hidden: int, layers: int, vocab: int, runs: int):
    from transformers import LlamaConfig

    from megatron_gift.checkpoint import integrity
    from megatron_gift.checkpoint.manager import list_files
    from megatron_gift.mcore import dist_ckpt
    from megatron_gift.mcore.model import build_gpt_model
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=False)
    settings = OptimSettings(lr=1e-4)
    model = wrap_for_training([build_gpt_model(cfg)], settings)
    optimizer, _ = build_optimizer(model, settings)
    for p in model[0].parameters():
        p.main_grad.normal_()
    optimizer.step()
    saves, hashes, sizes = [], [], []
    for _ in range(runs):
        out = Path(tempfile.mkdtemp(prefix="mg_ckpt_bench_"))
        try:
            start = time.perf_counter()
            dist_ckpt.save_training_state(model, optimizer, {"gift": {"step": 1}}, out)
            saves.append(time.perf_counter() - start)
            files = list_files(out)
            start = time.perf_counter()
            integrity.checksums(out, integrity.share(files, 0, 1))
            hashes.append(time.perf_counter() - start)
            sizes.append(sum(files.values()))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return saves, hashes, sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    from megatron_gift.mcore.testing.harness import run_distributed

    saves, hashes, sizes = run_distributed(measure, 1, hidden=a.hidden, layers=a.layers, vocab=a.vocab,
                                           runs=a.runs, timeout=3600)[0]
    save, hashed = statistics.median(saves), statistics.median(hashes)
    print(f"checkpoint {sizes[0] / 1e6:.0f} MB (model + Adam state, float32), {a.runs} runs")
    print(f"save (dist_checkpointing, sync) median {save:.2f} s; checksums median {hashed:.2f} s "
          f"({sizes[0] / 1e9 / hashed:.2f} GB/s)")
    print(f"hashing / save = {hashed / save:.3f}")


if __name__ == "__main__":
    main()
