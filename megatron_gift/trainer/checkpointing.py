"""The trainer's checkpoints: what one holds for a GIFT run, as named stateful parts, and how it is written.

Owns the run-level content of a checkpoint around the Megatron state that mcore/dist_ckpt.py saves (the
model chunks and the optimizer, sharded): metadata with the compatibility fingerprint and the layout,
every rank's RNG states, the metrics history, and the plain state `{"gift": {"step", <part>: ...}}` of the
named `Stateful` parts (the LR schedule, the prompt sampler). Directory handling (tmp dir, marker, rename,
keep_last, fallback) is checkpoint/manager.py's; when to save is the step loop's.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.distributed as dist

from megatron_gift.checkpoint import manager as ckpt_files
from megatron_gift.mcore import dist_ckpt

FINGERPRINT_ARCH_KEYS = ("model_type", "num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads",
                         "head_dim", "vocab_size", "tie_embeddings", "qkv_bias", "qk_norm")


@runtime_checkable
class Stateful(Protocol):
    """A part of the run whose state a checkpoint holds (plain Python / tensors, saved by rank 0's view)."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


def fingerprint(cfg, arch, loss) -> Dict[str, object]:
    """Config items a checkpoint must agree with to be resumed by this run (the layout may differ)."""
    model = {k: getattr(arch, k) for k in FINGERPRINT_ARCH_KEYS}
    model["padded_vocab_size"] = arch.padded_vocab_size(cfg.model.vocab_multiple)
    if arch.moe is not None:  # routed experts (dense models' fingerprints stay as they were)
        model["moe"] = {"num_experts": arch.moe.num_experts, "top_k": arch.moe.top_k,
                        "ffn_hidden_size": arch.moe.ffn_hidden_size, "layer_pattern": list(arch.moe.layer_pattern)}
    return {"model": model, "precision": {"dtype": cfg.precision.dtype},
            "loss": {"name": cfg.loss.name, "anchor": loss.anchor},
            "optim": {"use_distributed_optimizer": cfg.parallel.use_distributed_optimizer}}


def layout(cfg, rt) -> Dict[str, object]:
    p = cfg.parallel
    out = {"world_size": rt.world_size, "tp": p.tp, "pp": p.pp, "cp": p.cp, "vpp": p.vpp, "dp": rt.dp}
    out.update({k: v for k, v in (("ep", p.ep), ("etp", p.etp)) if v != 1})  # MoE layouts only
    return out


class TrainingCheckpointer:
    """Saves and loads one run's checkpoints: the sharded model + optimizer, the named plain parts, the
    RNG states of every rank, metadata and the metrics history. `metadata` holds the fingerprint, the
    layout and the plain config written into every checkpoint."""

    def __init__(self, files: ckpt_files.CheckpointManager, model, optimizer, parts: Mapping[str, Stateful],
                 metadata: Dict[str, Any], rank: int, async_saver: Optional[dist_ckpt.AsyncSaver] = None,
                 log: Callable[[str], None] = print, pg=None):
        for name, part in parts.items():
            if not isinstance(part, Stateful) or name == "step":
                raise TypeError(f"checkpoint part {name!r} must have state_dict() / load_state_dict()")
        self.files, self.model, self.optimizer, self.parts = files, model, optimizer, dict(parts)
        self.metadata, self.rank, self.async_saver, self.log, self.pg = metadata, rank, async_saver, log, pg

    def save(self, step: int, metrics_path: Optional[Path] = None) -> float:
        """All ranks: write this step's checkpoint into a tmp dir; committed (marker + rename) when complete.
        Returns the seconds this rank spent (with async_save: until the write was handed over)."""
        start = time.perf_counter()
        if self.async_saver is not None:
            self.async_saver.poll(blocking=True)  # one save in flight at a time
        tmp = self.files.begin(step)
        rng_dir = tmp / "rng"
        rng_dir.mkdir(exist_ok=True)
        torch.save(dist_ckpt.capture_rng_state(), rng_dir / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            self._write_rank0_files(tmp, step, metrics_path)
        dist.barrier()
        plain = {"gift": {"step": step, **{name: part.state_dict() for name, part in self.parts.items()}}}
        request = dist_ckpt.save_training_state(self.model, self.optimizer, plain, tmp / "model",
                                                async_save=self.async_saver is not None, pg=self.pg)
        if request is None:
            self.files.commit(tmp, step)
        else:
            self.async_saver.submit(request, lambda: self.files.commit(tmp, step), what=str(tmp))
        seconds = time.perf_counter() - start
        self.log(f"[checkpoint] step {step} " + (f"saved in {seconds:.2f}s" if request is None
                                                  else f"handed to the async writer in {seconds:.2f}s"))
        return seconds

    def _write_rank0_files(self, tmp: Path, step: int, metrics_path: Optional[Path]) -> None:
        (tmp / "model").mkdir()
        meta = {"format_version": ckpt_files.FORMAT_VERSION, "step": step,
                "optimizer_sharding": dist_ckpt.OPTIM_SHARDING, **self.metadata}
        (tmp / ckpt_files.METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        if metrics_path is not None and metrics_path.exists():
            shutil.copyfile(metrics_path, tmp / "metrics.jsonl")

    def load(self, path: Path) -> Tuple[int, str]:
        """All ranks: weights, optimizer, the named parts (any layout); RNG states when the layout is the one
        saved. Returns (step, a note on the RNG states)."""
        plain = dist_ckpt.load_training_state(self.model, self.optimizer, path / "model", pg=self.pg)["gift"]
        for name, part in self.parts.items():
            part.load_state_dict(plain[name])
        saved_layout = ckpt_files.read_metadata(path)["layout"]
        if saved_layout == self.metadata["layout"]:
            dist_ckpt.restore_rng_state(torch.load(path / "rng" / f"rank_{self.rank:05d}.pt", weights_only=False))
            note = "RNG states restored"
        else:
            note = f"layout changed from {saved_layout}: RNG states stay seeded from trainer.seed"
        return int(plain["step"]), note
