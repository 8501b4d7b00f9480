"""Conversion throughput and peak memory, side by side with a plain read of the same safetensors files.

    python benchmarks/convert.py [--runs 3] [--hidden 1024 --layers 8 --vocab 16000] [--dtype bfloat16]

Builds a random Llama-style model from a config (default ~244 MB in bf16), saves it with
save_pretrained, then for each run, in a fresh process each (so imports and page cache are alike):
  read    -- safe_open + get_tensor + clone of every tensor (the floor any converter pays),
  copy    -- read, then safetensors save_file + fsync (the floor of a durable converter),
  hf2mc   -- tools/convert_hf_to_mcore.convert (stream into the model, dist_checkpointing save),
  mc2hf   -- tools/convert_mcore_to_hf.export (dist_checkpointing load per key, safetensors write).
Prints MB/s (model bytes / seconds of the measured call, median of the runs), the ratio to the plain
read, and peak RSS growth during the call (ru_maxrss minus RSS before it) relative to the model size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(mode: str, src: Path, dst: Path) -> dict:
    """One measured call in this (fresh) process; returns seconds and peak RSS growth."""
    # Import everything first: the measured call should not pay (or count the memory of) imports.
    import megatron.core.dist_checkpointing  # noqa: F401
    import torch  # noqa: F401
    import tqdm  # noqa: F401
    from safetensors import safe_open
    from safetensors.torch import save_file

    import megatron_gift.mcore.convert  # noqa: F401
    from megatron_gift.cli.convert_hf_to_mcore import convert
    from megatron_gift.cli.convert_mcore_to_hf import export

    shutil.rmtree(dst, ignore_errors=True)
    before = _rss_bytes()
    start = time.perf_counter()
    if mode in ("read", "copy"):
        dst.mkdir(parents=True)
        for f in sorted(src.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                tensors = {k: h.get_tensor(k).clone() for k in h.keys()}  # owned copies: data really read
            if mode == "copy":
                save_file(tensors, str(dst / f.name))
                with open(dst / f.name, "rb+") as out:
                    os.fsync(out.fileno())
            del tensors
    elif mode == "hf2mc":
        convert(src, dst, dtype="bfloat16", quiet=True)
    else:
        export(src, dst, quiet=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_growth": _peak_bytes() - before, "rss_before": before}


def make_model(out: Path, hidden: int, layers: int, vocab: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _run_child(mode: str, src: Path, dst: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--dst", str(dst)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", choices=["read", "copy", "hf2mc", "mc2hf"])
    p.add_argument("--src", type=Path)
    p.add_argument("--dst", type=Path)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.src, args.dst)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="convert_bench_"))
    hf, mc, back = work / "hf", work / "mcore", work / "hf_back"
    nbytes = make_model(hf, args.hidden, args.layers, args.vocab)
    mb = nbytes / 1e6
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {mb:.1f} MB (bf16)")
    results = {m: [] for m in ("read", "copy", "hf2mc", "mc2hf")}
    for _ in range(args.runs):
        results["read"].append(_run_child("read", hf, work / "read"))
        results["copy"].append(_run_child("copy", hf, work / "copy"))
        results["hf2mc"].append(_run_child("hf2mc", hf, mc))
        results["mc2hf"].append(_run_child("mc2hf", mc, back))
    read_s = statistics.median(r["seconds"] for r in results["read"])
    copy_s = statistics.median(r["seconds"] for r in results["copy"])
    for mode, runs in results.items():
        s = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_growth"] for r in runs)
        print(f"{mode:6s} median {s:7.3f} s  {mb / s:8.1f} MB/s  throughput / read {read_s / s:6.3f}  / copy {copy_s / s:6.3f}  "
              f"peak RSS growth {peak / 1e6:7.1f} MB = {peak / nbytes:.2f}x model")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
