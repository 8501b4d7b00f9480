"""MoE training checkpoints reshard over EP: saved at EP=2 (two gloo ranks, DP=2 x EP=2) after 2 GIFT steps,
loaded by one process (EP=1) and re-saved, and that copy loaded back at EP=2: every tensor (weights, Adam
moments, fp32 main params; the plain and the distributed optimizer) re-saves bitwise, and the next 2 steps'
losses equal the EP=2 continuation (a tiny Mixtral converted from transformers; mcore/dist_ckpt.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron_gift.cli.convert_hf_to_mcore import convert
from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_checkpoint_reshard import _allow_children, _microbatches, _save, _steps
from tests.distributed.test_gift_schedule import make_groups
from tests.tiny_hf import make_tiny_model, tiny_moe_configs

pytestmark = pytest.mark.distributed
RTOL = 1e-5


def _setup(mcore_dir, distopt):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.mcore.convert import load_mcore_checkpoint
    from megatron_gift.mcore.model import build_gpt_model
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    arch = load_hf_arch(Path(mcore_dir))
    model = build_gpt_model(arch, dtype=torch.float32, perform_initialization=False)
    load_mcore_checkpoint(model, Path(mcore_dir))
    settings = OptimSettings(lr=3e-3, clip_grad=1.0, use_distributed_optimizer=distopt)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    ddp = wrap_for_training([model], settings, pg)
    optimizer, scheduler = build_optimizer(ddp, settings)
    schedule = GiftSchedule(ddp, build_loss("gift", {"grad_mode": "full", "beta": 0.5}),
                            ScheduleSettings(vocab_size=arch.vocab_size), pg)
    return ddp, optimizer, scheduler, schedule


def _run(rank, world_size, mcore_dir, groups, src, dst, save):
    from megatron_gift.mcore import dist_ckpt

    _allow_children()
    out = {}
    try:
        for distopt in (False, True):
            ddp, optimizer, scheduler, schedule = _setup(mcore_dir, distopt)
            mbs = _microbatches(groups)
            if save:
                _steps(schedule, optimizer, scheduler, mbs, 2)
                _save(ddp, optimizer, scheduler, f"{dst}/opt{int(distopt)}")
            else:
                plain = dist_ckpt.load_training_state(ddp, optimizer, Path(f"{src}/opt{int(distopt)}"))
                scheduler.load_state_dict(plain["gift"]["scheduler"])
                _save(ddp, optimizer, scheduler, f"{dst}/opt{int(distopt)}")
            out[distopt] = _steps(schedule, optimizer, scheduler, mbs, 2)
    finally:
        dist_ckpt.shutdown_writer_helpers()
    return out


def test_ep2_checkpoint_resumes_at_ep1_and_back(tmp_path):
    from megatron_gift.mcore.dist_ckpt import canonical_checkpoint_tensors

    cfg = tiny_moe_configs()["mixtral_tied"]
    make_tiny_model(cfg, seed=2).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mcore", dtype="float32", quiet=True)
    kw = dict(mcore_dir=str(tmp_path / "mcore"), groups=make_groups(n_groups=4, size=4, seed=5))
    ep2 = run_distributed(_run, 2, ep=2, **kw, src=None, dst=str(tmp_path / "ep2"), save=True)
    (ep1,) = run_distributed(_run, 1, **kw, src=str(tmp_path / "ep2"), dst=str(tmp_path / "ep1"), save=False)
    back = run_distributed(_run, 2, ep=2, **kw, src=str(tmp_path / "ep1"), dst=str(tmp_path / "back"), save=False)
    for distopt in (False, True):
        original = canonical_checkpoint_tensors(tmp_path / "ep2" / f"opt{int(distopt)}")
        assert any(".experts." in k for k in original) and any("exp_avg_sq" in k for k in original)
        for copy in ("ep1", "back"):
            resaved = canonical_checkpoint_tensors(tmp_path / copy / f"opt{int(distopt)}")
            assert original.keys() == resaved.keys()
            differ = [k for k in original if not torch.equal(original[k], resaved[k])]
            assert not differ, (copy, distopt, differ[:5])
        reference = ep2[0][distopt]
        print(f"distributed optimizer={distopt}: EP=2 continuation {reference}, EP=1 {ep1[distopt]}, back {back[0][distopt]}")
        assert reference[1] != reference[0]
        for got in (ep1[distopt], back[0][distopt], back[1][distopt]):
            assert got == pytest.approx(reference, rel=RTOL)
