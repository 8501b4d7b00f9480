"""Convert a Megatron-Core distributed checkpoint back into a Hugging Face model directory.

    megatron-gift-convert-mcore-to-hf --mcore-dir DIR --out DIR [--overwrite] [--key-prefix P]

--mcore-dir holds config.json (the HF config), megatron_gift_conversion.json and model/ (the dist
checkpoint), as megatron-gift-convert-hf-to-mcore writes it. A training checkpoint's model part can be
exported the same way once laid out like that (its keys may carry a prefix: --key-prefix). Tensors are
loaded one layer at a time and written as sharded safetensors + index + config.json + tokenizer files,
which transformers.AutoModelForCausalLM.from_pretrained loads. Written atomically (temp dir, rename).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_gift.cli.args import to_stderr


def export(mcore_dir: Path, out: Path, overwrite: bool = False, key_prefix: str = "",
           max_shard_bytes: int = 2 * 1024**3, quiet: bool = False) -> dict:
    """Library entry point; returns a small summary (tensor count, bytes, seconds)."""
    from tqdm import tqdm

    from megatron_gift.hf.files import atomic_output_dir, check_disjoint
    from megatron_gift.mcore.convert import read_conversion_info, write_mcore_checkpoint_as_hf

    mcore_dir = Path(mcore_dir)
    if mcore_dir.exists() and not mcore_dir.is_dir():
        raise ValueError(f"--mcore-dir {mcore_dir} is a file: give the converted checkpoint's directory")
    check_disjoint(mcore_dir, out, "--mcore-dir")
    read_conversion_info(mcore_dir)  # a directory that is not a conversion is an error before --out is touched
    start = time.perf_counter()
    with atomic_output_dir(out, overwrite, sources=[mcore_dir], log=to_stderr) as tmp:
        n, size = write_mcore_checkpoint_as_hf(mcore_dir, tmp, key_prefix, max_shard_bytes,
                                               progress=lambda it: tqdm(it, desc="mcore->hf", unit="tensor",
                                                                        disable=quiet))
    return {"tensors": n, "bytes": size, "seconds": round(time.perf_counter() - start, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore-dir", type=Path, required=True, help="converted checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="output HF directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once complete)")
    p.add_argument("--key-prefix", default="", help="prefix of the model's keys in the dist checkpoint")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        s = export(args.mcore_dir, args.out, args.overwrite, args.key_prefix, int(args.max_shard_gb * 1024**3), args.quiet)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB, {s['seconds']} s)")
    return 0


if __name__ == "__main__":  # guard required: dist_checkpointing may spawn worker processes
    sys.exit(main())
