"""The trainer's checkpoints: what one holds for a GIFT run and how the Trainer writes and reads it.

Owns the run-level content of a checkpoint (metadata with the compatibility fingerprint and the layout,
every rank's RNG states, the metrics history, the plain state: step, LR schedule, sampler) around the
Megatron state that mcore/dist_ckpt.py saves, and the save cadence. Directory handling (tmp dir, marker,
rename, keep_last, fallback) is checkpoint/manager.py's. Mixed into `Trainer`, whose attributes it uses.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

from megatron_gift.checkpoint import manager as ckpt_files
from megatron_gift.config.schema import to_plain
from megatron_gift.mcore import dist_ckpt


class TrainerCheckpointing:
    """Save / load of the Trainer's state; see the module docstring."""

    def fingerprint(self) -> Dict[str, object]:
        """Config items a checkpoint must agree with to be resumed by this run (the layout may differ)."""
        a, cfg = self.arch, self.cfg
        model = {k: getattr(a, k) for k in ("model_type", "num_layers", "hidden_size", "ffn_hidden_size", "num_heads",
                                            "num_kv_heads", "head_dim", "vocab_size", "tie_embeddings", "qkv_bias",
                                            "qk_norm")}
        model["padded_vocab_size"] = a.padded_vocab_size(cfg.model.vocab_multiple)
        if a.moe is not None:  # routed experts (dense models' fingerprints stay as they were)
            model["moe"] = {"num_experts": a.moe.num_experts, "top_k": a.moe.top_k,
                            "ffn_hidden_size": a.moe.ffn_hidden_size, "layer_pattern": list(a.moe.layer_pattern)}
        return {"model": model, "precision": {"dtype": cfg.precision.dtype},
                "loss": {"name": cfg.loss.name, "anchor": getattr(self.loss, "anchor", None)},
                "optim": {"use_distributed_optimizer": cfg.parallel.use_distributed_optimizer}}

    def _layout(self) -> Dict[str, object]:
        p = self.cfg.parallel
        layout = {"world_size": self.rt.world_size, "tp": p.tp, "pp": p.pp, "cp": p.cp, "vpp": p.vpp, "dp": self.rt.dp}
        layout.update({k: v for k, v in (("ep", p.ep), ("etp", p.etp)) if v != 1})  # MoE layouts only
        return layout

    def save_checkpoint(self) -> None:
        """All ranks: write this step's checkpoint into a tmp dir; committed (marker + rename) when complete."""
        start, step = time.perf_counter(), self.step
        if self.async_saver is not None:
            self.async_saver.poll(blocking=True)  # one save in flight at a time
        tmp = self.checkpoints.begin(step)
        rng_dir = tmp / "rng"
        rng_dir.mkdir(exist_ok=True)
        torch.save(dist_ckpt.capture_rng_state(), rng_dir / f"rank_{self.rt.rank:05d}.pt")
        if self.rt.rank == 0:
            (tmp / "model").mkdir()
            meta = {"format_version": ckpt_files.FORMAT_VERSION, "step": step, "fingerprint": self.fingerprint(),
                    "layout": self._layout(), "optimizer_sharding": dist_ckpt.OPTIM_SHARDING,
                    "config": to_plain(self.cfg)}
            (tmp / ckpt_files.METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            if self.metrics is not None and self.metrics.path.exists():
                shutil.copyfile(self.metrics.path, tmp / "metrics.jsonl")
        dist.barrier()
        plain = {"gift": {"step": step, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict()}}
        request = dist_ckpt.save_training_state(self.model, self.optimizer, plain, tmp / "model",
                                                async_save=self.async_saver is not None)
        if request is None:
            self.checkpoints.commit(tmp, step)
        else:
            self.async_saver.submit(request, lambda: self.checkpoints.commit(tmp, step), what=str(tmp))
        seconds = time.perf_counter() - start
        self.stop.note_save(seconds)
        self.say(f"[checkpoint] step {step} " + (f"saved in {seconds:.2f}s" if request is None
                                                  else f"handed to the async writer in {seconds:.2f}s"))

    def load_checkpoint(self, path: Path) -> None:
        """All ranks: weights, optimizer, schedule, sampler, step (any layout); RNG states when the layout is
        the one saved; then the engine gets the loaded weights."""
        start = time.perf_counter()
        plain = dist_ckpt.load_training_state(self.model, self.optimizer, path / "model")["gift"]
        self.scheduler.load_state_dict(plain["scheduler"])
        self.sampler.load_state_dict(plain["sampler"])
        self.step = int(plain["step"])
        self.sync_weights()
        saved_layout = ckpt_files.read_metadata(path)["layout"]
        if saved_layout == self._layout():
            dist_ckpt.restore_rng_state(torch.load(path / "rng" / f"rank_{self.rt.rank:05d}.pt", weights_only=False))
            note = "RNG states restored"
        else:
            note = f"layout changed from {saved_layout}: RNG states stay seeded from trainer.seed"
        self.say(f"[checkpoint] resumed from {path} at step {self.step} in {time.perf_counter() - start:.2f}s ({note})")

    def _save_due(self) -> bool:
        every, total = self.cfg.trainer.save_every, self.cfg.trainer.steps
        return every > 0 and (self.step % every == 0 or self.step == total)
