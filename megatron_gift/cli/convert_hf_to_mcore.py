"""Convert a Hugging Face checkpoint (safetensors) into a Megatron-Core distributed checkpoint.

    megatron-gift-convert-hf-to-mcore --hf-dir DIR --out DIR [--dtype bfloat16] [--overwrite]

Output layout: see megatron_gift/mcore/convert.py. Tensors stream from the safetensors shards one
parameter at a time into a model built for TP=1/PP=1 (no random init), then are saved with
dist_checkpointing; the result loads under any TP / PP layout. The output is written to a temp dir next
to --out and renamed into place only when complete; an existing --out is refused without --overwrite.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from megatron_gift.hf.hub import resolve_model_dir
from megatron_gift.cli.args import positive_int, to_stderr


def convert(hf_dir: Path, out: Path, dtype: str = "bfloat16", overwrite: bool = False,
            vocab_multiple: int = 128, quiet: bool = False) -> dict:
    """Library entry point (tests and benchmarks call this); returns the conversion info written."""
    from tqdm import tqdm

    from megatron_gift.hf.files import HFReader, atomic_output_dir, check_disjoint, copy_side_files
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.mcore.convert import CONVERSION_INFO, MODEL_SUBDIR, save_hf_as_mcore
    from megatron_gift.mcore.model import resolve_dtype

    hf_dir = Path(hf_dir)
    if hf_dir.exists() and not hf_dir.is_dir():
        raise ValueError(f"--hf-dir {hf_dir} is a file: give the model's directory (config.json + *.safetensors)")
    check_disjoint(hf_dir, out, "--hf-dir")
    load_hf_arch(hf_dir)  # refuse unsupported configs before creating anything
    total = HFReader(hf_dir).nbytes()
    start = time.perf_counter()
    with atomic_output_dir(out, overwrite, sources=[hf_dir], log=to_stderr) as tmp:
        with tqdm(total=total, unit="B", unit_scale=True, desc="hf->mcore", disable=quiet) as bar:
            info = save_hf_as_mcore(hf_dir, tmp / MODEL_SUBDIR, dtype=resolve_dtype(dtype),
                                    vocab_multiple=vocab_multiple, progress=bar.update)
        shutil.copy2(hf_dir / "config.json", tmp / "config.json")
        info["side_files"] = copy_side_files(hf_dir, tmp)
        info["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / CONVERSION_INFO).write_text(json.dumps(info, indent=2))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", type=Path, required=True, help="HF model directory (config.json + safetensors) or a Hub model id in the local cache")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vocab-multiple", type=positive_int, default=128, help="pad the vocabulary to a multiple of this")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        info = convert(Path(resolve_model_dir(str(args.hf_dir), "--hf-dir")), args.out, args.dtype, args.overwrite, args.vocab_multiple, args.quiet)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({info['model_type']}, {info['dtype']}, {info['seconds']} s)")
    return 0


if __name__ == "__main__":  # guard required: dist_checkpointing spawns writer processes
    sys.exit(main())
