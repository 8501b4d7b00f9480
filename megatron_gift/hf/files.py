"""Hugging Face checkpoint files: streaming safetensors reads, sharded writes, side files, atomic output dirs.

Owns: reading a HF model directory tensor by tensor (header parsed, each tensor read on demand), writing
sharded safetensors with an index that transformers loads, copying config / tokenizer files, and the
"temp dir next to the output, then rename" discipline (refusing to overwrite without permission).
Does not own: tensor names or transforms (checkpoint/mapping.py), Megatron files (mcore/convert.py).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
# The marker of a converted Megatron checkpoint directory (mcore/convert.py writes and reads it; evaluation
# recognises such a directory by it): defined here, in a module that does not import megatron.
CONVERSION_INFO = "megatron_gift_conversion.json"
SINGLE_NAME = "model.safetensors"
# Everything a tokenizer / generation setup may need; copied when present.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
)


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, truncated, or belongs to another model."""


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Shard:
    """One safetensors file: header parsed up front (truncation checked), tensors read with pread.

    Plain reads instead of safe_open's mmap: a mapped file's touched pages count in the process's
    RSS until it is closed, which would double the converter's apparent peak for a single-file model.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
            raise CheckpointError(f"{path}: unreadable or truncated safetensors header ({e})") from e
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        size = path.stat().st_size
        if size < self.base + end:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header needs {self.base + end})")

    def get(self, name: str) -> torch.Tensor:
        meta = self.entries[name]
        dtype = _ST_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        if end == start:
            return torch.empty(meta["shape"], dtype=dtype)
        buf = bytearray(end - start)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + start)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        return torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])


class HFReader:
    """Tensor-by-tensor access to a HF safetensors checkpoint (only the requested tensor is in memory)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self._shards: Dict[str, _Shard] = {}
        self.weight_map = self._weight_map()

    def _shard(self, fname: str) -> _Shard:
        if fname not in self._shards:
            self._shards[fname] = _Shard(self.dir / fname)
        return self._shards[fname]

    def _weight_map(self) -> Dict[str, str]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            for f in sorted(set(weight_map.values())):
                if not (self.dir / f).is_file():
                    raise CheckpointError(f"{self.dir / f}: shard listed in {INDEX_NAME} is missing")
                missing = sorted(k for k, v in weight_map.items() if v == f and k not in self._shard(f).entries)
                if missing:
                    raise CheckpointError(f"{self.dir / f}: lacks tensors the index puts there: {missing[:3]}")
            return weight_map
        if (self.dir / SINGLE_NAME).is_file():
            return {k: SINGLE_NAME for k in self._shard(SINGLE_NAME).entries}
        others = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
        hint = f" (found {others}: only safetensors checkpoints are supported)" if others else ""
        raise CheckpointError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")

    def names(self) -> List[str]:
        return list(self.weight_map)

    def nbytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in set(self.weight_map.values()))

    def get(self, name: str) -> torch.Tensor:
        fname = self.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} not found (checkpoint of another model?)")
        return self._shard(fname).get(name)

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can treat readers uniformly."""


class ShardedSafetensorsWriter:
    """Buffers tensors up to `max_shard_bytes`, writes model-0000i-of-0000N.safetensors and the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in s for s in self._shards):
            raise CheckpointError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # Views of a fused tensor share storage, which safetensors refuses: own a compact copy.
        self._buffer[name] = tensor.detach().to("cpu").contiguous().clone()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        i = len(self._shards)
        save_file(self._buffer, str(self.dir / f"shard-{i}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> None:
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i}.tmp", self.dir / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2))


def copy_side_files(src: Path, dst: Path) -> List[str]:
    """Copy tokenizer / generation files that exist in src; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def check_disjoint(source: Path, out: Path, source_flag: str = "source", out_flag: str = "--out") -> None:
    """Refuse an output that is, contains or sits inside the source: writing or replacing it would delete
    (part of) the source model."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src == dst:
        why = "is"
    elif src.is_relative_to(dst):
        why = "contains"
    elif dst.is_relative_to(src):
        why = "sits inside"
    else:
        return
    raise ValueError(f"{out_flag} {out} {why} the {source_flag} {source}: the output would replace or mix with the "
                     f"source model (--overwrite never deletes a source); choose a directory outside it")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, sources: Sequence[Path] = (),
                      log: Callable[[str], None] = print) -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it replaces `out`, on any error it is removed.

    An existing `out` is refused unless overwrite; with overwrite it is kept until the new one is complete.
    An `out` that is, contains or sits inside one of `sources` is refused (check_disjoint). Temp dirs of this
    output left by killed processes (`.OUT.tmp-PID` whose process is dead) are removed first, with a message.
    """
    from megatron_gift.resilience.leftovers import clean_stale, drop_owner, write_owner

    for source in sources:
        check_disjoint(source, out)
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, f".{glob.escape(out.name)}.tmp-*", log=log)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_owner(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    drop_owner(tmp)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
