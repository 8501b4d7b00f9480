"""Megatron side of the HF <-> Megatron converters: converted-checkpoint layout, save, load, export stream.

A converted checkpoint directory (what megatron-gift-convert-hf-to-mcore writes):
    config.json                      the source HF config (the model is rebuilt from it)
    tokenizer*.json, ...             tokenizer / generation files copied from the HF dir
    megatron_gift_conversion.json    {format_version, model_type, dtype, vocab_multiple, padded_vocab_size, ...}
    model/                           megatron.core.dist_checkpointing checkpoint of GPTModel.sharded_state_dict()
The dist checkpoint stores full (global) tensors under Megatron's sharded keys (layers stacked on a leading
axis, Transformer Engine spellings of the fused norms), so it loads under any TP / PP layout and either spec.
A training checkpoint's model part has the same keys, possibly under a prefix: export takes `key_prefix`
and a directory holding config.json + megatron_gift_conversion.json beside the dist checkpoint.

Owns: streaming HF tensors into a model built for TP=1/PP=1, saving it, loading it into a model of any
layout, and streaming a checkpoint back out as HF tensors one layer at a time (peak ~ one layer); the
trainer's one-off conversion for TP / PP > 1 (`convert_for_model_parallel`, the converter CLI in a process
of its own).
Does not own: names / transforms (checkpoint/mapping.py), HF files (checkpoint/hf.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_gift.hf.files import CONVERSION_INFO, CheckpointError, HFReader, ShardedSafetensorsWriter, copy_side_files
from megatron_gift.hf.arch import DEFAULT_VOCAB_MULTIPLE, HFArch, load_hf_arch
from megatron_gift.hf.mapping import (
    Entry,
    hf_to_mcore_tensors,
    mapping_entries,
    mcore_to_hf_tensors,
    unexpected_hf_names,
)
from megatron_gift.mcore.experts import gather_expert, is_expert_param
from megatron_gift.mcore.model import build_gpt_model, resolve_dtype

MODEL_SUBDIR = "model"
FORMAT_VERSION = 1
_LAYER_PREFIX = "decoder.layers."


@contextlib.contextmanager
def single_process_parallel_state(seed: int = 1234) -> Iterator[None]:
    """World of one (gloo) with TP=PP=1 for the converters; reuses an existing setup, tears down only its own."""
    with contextlib.ExitStack() as stack:
        if not torch.cuda.is_available():
            from megatron_gift.mcore.cpu_compat import enable_cpu_compat

            stack.enter_context(enable_cpu_compat())
        if not dist.is_initialized():
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mg_convert_pg_"))
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
            stack.callback(dist.destroy_process_group)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1)
            stack.callback(parallel_state.destroy_model_parallel)
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        yield


def read_conversion_info(mcore_dir: Path) -> Dict[str, Any]:
    path = Path(mcore_dir) / CONVERSION_INFO
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a checkpoint written by megatron-gift-convert-hf-to-mcore?)")
    info = json.loads(path.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {info.get('format_version')} != supported {FORMAT_VERSION}")
    return info


def copy_hf_into_model(
    model: torch.nn.Module,
    arch: HFArch,
    get_hf: Callable[[str], torch.Tensor],
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Fill a full (TP=1, PP=1) model from HF tensors, one parameter at a time; every parameter must be set."""
    params = dict(model.named_parameters())
    missing = set(params)
    with torch.no_grad():
        for name, tensor in hf_to_mcore_tensors(arch, get_hf, vocab_multiple=vocab_multiple):
            if name not in params:
                raise CheckpointError(f"Megatron model has no parameter {name!r} (model / config mismatch)")
            p = params[name]
            if tuple(p.shape) != tuple(tensor.shape):
                raise CheckpointError(f"tensor {name!r}: converted shape {tuple(tensor.shape)} != model's {tuple(p.shape)}")
            p.copy_(tensor)
            missing.discard(name)
            if progress is not None:
                progress(tensor.numel() * tensor.element_size())
            del tensor
    if missing:
        raise CheckpointError(f"HF checkpoint left Megatron parameters unset: {sorted(missing)}")


def save_hf_as_mcore(
    hf_dir: Path,
    ckpt_dir: Path,
    *,
    dtype: torch.dtype,
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
    progress: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Stream the HF checkpoint in `hf_dir` into a dist checkpoint at `ckpt_dir`; returns conversion info."""
    arch = load_hf_arch(hf_dir)
    reader = HFReader(hf_dir)
    extra = [n for n in unexpected_hf_names(arch, reader.names()) if not (arch.tie_embeddings and n == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{hf_dir}: tensors not expected for {arch.model_type} with this config: {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''} (checkpoint of another model?)")
    with single_process_parallel_state():
        # Host memory even on a GPU host: the model is only a staging buffer for the save.
        model = build_gpt_model(arch, dtype=dtype, vocab_multiple=vocab_multiple, use_te=False,
                                perform_initialization=False, use_cpu_initialization=True)
        try:
            copy_hf_into_model(model, arch, reader.get, vocab_multiple, progress)
        finally:
            reader.close()
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))
    return {
        "format_version": FORMAT_VERSION,
        "model_type": arch.model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": arch.vocab_size,
        "vocab_multiple": vocab_multiple,
        "padded_vocab_size": arch.padded_vocab_size(vocab_multiple),
        "num_layers": arch.num_layers,
        "tie_embeddings": arch.tie_embeddings,
        "source": str(Path(hf_dir).absolute()),
        "source_bytes": reader.nbytes(),
    }


def load_mcore_checkpoint(model: torch.nn.Module, mcore_dir: Path, key_prefix: str = "") -> None:
    """Load a converted checkpoint into `model` (this rank's part, any TP / PP); all ranks call it."""
    ckpt = Path(mcore_dir) / MODEL_SUBDIR
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: missing dist checkpoint directory")
    sharded = model.sharded_state_dict(prefix=key_prefix)
    _check_against_metadata(sharded, ckpt)
    loaded = dist_checkpointing.load(sharded, str(ckpt))
    if key_prefix:
        loaded = {k.removeprefix(key_prefix): v for k, v in loaded.items()}
    model.load_state_dict(loaded, strict=True)


def _check_against_metadata(sharded: Dict[str, Any], ckpt: Path) -> None:
    """Name the first tensor whose key or global shape differs: a checkpoint of another model."""
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    for sh in sharded.values():
        if not isinstance(sh, ShardedTensor):
            continue
        if sh.key not in meta:
            raise CheckpointError(f"{ckpt}: has no tensor {sh.key!r} (checkpoint of another model?)")
        if tuple(meta[sh.key].global_shape) != tuple(sh.global_shape):
            raise CheckpointError(f"{ckpt}: tensor {sh.key!r} has shape {tuple(meta[sh.key].global_shape)}, "
                                  f"the model expects {tuple(sh.global_shape)}")


_EXPERT_KEY = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")


def _ckpt_key(e: Entry, arch: HFArch) -> Tuple[str, Optional[int]]:
    """Sharded key and stacked index of an entry (keys use TE spellings). Dense models stack layers on a
    leading axis; MoE models (Megatron's non-homogeneous layers) have per-layer keys with the experts of a
    layer stacked on a leading axis."""
    if arch.moe is not None:
        m = _EXPERT_KEY.match(e.mcore)
        return (f"{m.group(1)}.experts.{m.group(3)}", int(m.group(2))) if m else (e.te, None)
    if e.te.startswith(_LAYER_PREFIX):
        layer, rest = e.te[len(_LAYER_PREFIX):].split(".", 1)
        return _LAYER_PREFIX + rest, int(layer)
    return e.te, None


def iter_mcore_checkpoint_as_hf(
    mcore_dir: Path, key_prefix: str = "", arch: Optional[HFArch] = None
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) from a converted / training checkpoint, one sharded key at a time.

    Peak memory is about the largest key (e.g. linear_fc1 of all layers, stacked). Loading single
    layers would need partial shards, which megatron-core 0.16.1 cannot express in a world of one
    process (its torch-sharded-tensor shim places every other fragment on rank (r + 1) % 1 == r).
    """
    arch = arch or load_hf_arch(mcore_dir)
    ckpt = Path(mcore_dir) / MODEL_SUBDIR
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: missing dist checkpoint directory")
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    by_key: Dict[str, Dict[Optional[int], Entry]] = {}
    for e in mapping_entries(arch):
        key, layer = _ckpt_key(e, arch)
        by_key.setdefault(key_prefix + key, {})[layer] = e
    for key, entries in by_key.items():
        if key not in meta:
            raise CheckpointError(f"{ckpt}: has no tensor {key!r} needed for {arch.model_type} "
                                  "(checkpoint of another model, or wrong key prefix?)")
        shape = tuple(meta[key].global_shape)
        stacked = None not in entries
        if stacked and shape[0] != len(entries):
            what = "experts" if arch.moe is not None else "layers"
            raise CheckpointError(f"{ckpt}: {key!r} stacks {shape[0]} {what}, config.json says {len(entries)}")
        sharded = {key: ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=meta[key].dtype), replica_id=0)}
        full = dist_checkpointing.load(sharded, str(ckpt), validate_access_integrity=False)[key]
        for layer, e in entries.items():
            yield from mcore_to_hf_tensors(None, [(e.te, full[layer] if stacked else full)], arch=arch)
        del full


# TP split dimension by parameter name: the layout is fixed by Megatron's layer types (column-parallel:
# dim 0, row-parallel: dim 1, vocab-parallel embedding / output: dim 0; norms replicated). Named here
# because the `tensor_model_parallel` attributes are not set when perform_initialization=False.
_TP_DIM_BY_SUFFIX = (
    ("embedding.word_embeddings.weight", 0), ("output_layer.weight", 0),
    ("linear_qkv.weight", 0), ("linear_qkv.bias", 0), ("linear_fc1.weight", 0),
    ("linear_proj.weight", 1), ("linear_fc2.weight", 1),
)


def write_mcore_checkpoint_as_hf(mcore_dir: Path, out_dir: Path, key_prefix: str = "",
                                 max_shard_bytes: int = 2 * 1024**3,
                                 progress: Callable[[Iterator], Iterator] = lambda it: it) -> Tuple[int, int]:
    """Write the HF form of a converted Megatron checkpoint into the (new, empty) out_dir, one key at a time:
    sharded safetensors + index in the checkpoint's dtype, config.json, tokenizer files. `progress` wraps the
    tensor stream (a progress bar). Returns (tensors, bytes). The converter CLI and the evaluation use it."""
    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    info = read_conversion_info(mcore_dir)
    arch = load_hf_arch(mcore_dir)
    # Megatron's local-spec norms keep float32 weights in a bf16 model; HF gets the declared dtype throughout.
    dtype = resolve_dtype(info["dtype"])
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    n = 0
    with single_process_parallel_state():
        for name, tensor in progress(iter_mcore_checkpoint_as_hf(mcore_dir, key_prefix, arch)):
            writer.add(name, tensor.to(dtype))
            n += 1
    writer.finish()
    config = json.loads((mcore_dir / "config.json").read_text())
    config["dtype"] = info["dtype"]  # the tensors are written in the checkpoint's dtype
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    copy_side_files(mcore_dir, out_dir)
    return n, writer.total_bytes


def _tp_dim(name: str) -> Optional[int]:
    return next((d for suffix, d in _TP_DIM_BY_SUFFIX if name.endswith(suffix)), None)


def _gather_tp(name: str, p: torch.Tensor, tp_group, tp: int) -> torch.Tensor:
    """Full tensor of a TP-sharded parameter (all TP ranks call this for every parameter, in order)."""
    dim = _tp_dim(name)
    if tp == 1 or dim is None:
        return p.detach()
    parts = [torch.empty_like(p) for _ in range(tp)]
    dist.all_gather(parts, p.detach().contiguous(), group=tp_group)
    if name.endswith("mlp.linear_fc1.weight"):
        # SwiGLU: each rank holds [gate_shard; up_shard]; the full tensor is [gate; up].
        halves = [torch.chunk(x, 2, dim=dim) for x in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def iter_model_as_hf(model: torch.nn.Module, arch: HFArch, tp_group=None,
                     value: Optional[Callable[[torch.nn.Parameter], torch.Tensor]] = None,
                     ) -> Iterator[Tuple[str, torch.Tensor]]:
    """This pipeline stage's parameters as (hf_name, full tensor), gathered over TP, global layer numbers.

    Every TP rank of the stage must iterate it to the end (it all-gathers); all of them get the tensors.
    MoE expert weights are gathered over expert TP and EP (all ranks of those groups get every expert).
    `value(param)` streams another per-parameter tensor of the same layout instead (e.g. its main_grad).
    The model must be the bare GPTModel (unwrap DDP / Float16Module first). This is the Megatron side
    of the rollout weight sync; names come from checkpoint/mapping.py. tp_group: the tensor-parallel group
    (None: Megatron's parallel_state one).
    """
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    offset = layers[0].layer_number - 1 if layers is not None and len(layers) else 0
    tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)

    def gathered():
        for n, p in model.named_parameters():
            p = p if value is None else value(p)
            if arch.moe is not None and is_expert_param(n):  # over ETP and EP, global expert numbers
                yield from gather_expert(n, p, arch.moe.num_experts)
            else:
                yield n, _gather_tp(n, p, tp_group, tp)

    yield from mcore_to_hf_tensors(None, gathered(), layer_offset=offset, arch=arch)


def convert_for_model_parallel(hf_dir: str, out: Path, dtype: str, vocab_multiple: int, log=print) -> None:
    """Make (once) the Megatron checkpoint that TP / PP > 1 loads, with the converter command in a
    separate process (the converter builds a one-process TP=1 model; this process is already in the job's
    layout). An existing conversion of the same source is reused."""
    source = str(Path(hf_dir).absolute())
    if (out / CONVERSION_INFO).exists():
        info = read_conversion_info(out)
        if info.get("source") == source and info.get("vocab_multiple") == vocab_multiple and \
                info.get("dtype") == dtype:
            log(f"[train] reusing the Megatron checkpoint {out} converted from {hf_dir}")
            return
        raise ValueError(f"{out} holds a conversion of {info.get('source')} ({info.get('dtype')}, vocab multiple "
                         f"{info.get('vocab_multiple')}), not of {source} ({dtype}, {vocab_multiple}): remove it or set "
                         "model.mcore_dir")
    log(f"[train] converting {hf_dir} into a Megatron checkpoint at {out} (TP or PP > 1 loads one)")
    cmd = [sys.executable, "-m", "megatron_gift.cli.convert_hf_to_mcore", "--hf-dir", str(hf_dir), "--out", str(out), "--dtype", dtype,
           "--vocab-multiple", str(vocab_multiple), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}  # a one-process job of its own
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {hf_dir} failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")
