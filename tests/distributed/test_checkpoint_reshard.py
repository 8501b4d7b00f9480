"""Training checkpoints reshard: saved by one process, resumed under TP=2, DP=2 or PP=2 (two gloo ranks).

The functions the trainer uses (mcore/dist_ckpt.py) save a tiny GPT's weights, the Megatron optimizer
(plain, and distributed with its `fully_reshardable` format) and the LR schedule after 2 GIFT steps on a
fixed batch; the single process then continues 2 more steps. Each other layout loads the checkpoint and
(1) re-saves it at once: every tensor (weights, Adam moments, fp32 main params) equals the original
bitwise, so nothing was lost or perturbed by resharding; (2) runs the same 2 steps: the losses equal the
single-process continuation within float-summation tolerance (the second step depends on the loaded Adam
state, the first on the loaded weights). Runtime: ~1-2 min (three 2-rank spawns).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups
from tests.distributed.tiny_gpt import VOCAB, _build_model, _config

pytestmark = pytest.mark.distributed
RTOL = 1e-5


def _setup(distopt: bool):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    settings = OptimSettings(lr=3e-3, clip_grad=1.0, use_distributed_optimizer=distopt, decay_style="linear",
                             decay_steps=10)
    ddp = wrap_for_training([_build_model(_config())], settings)
    optimizer, scheduler = build_optimizer(ddp, settings)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    schedule = GiftSchedule(ddp, build_loss("gift", {"grad_mode": "full", "beta": 0.5}),
                            ScheduleSettings(vocab_size=VOCAB), pg)
    return ddp, optimizer, scheduler, schedule


def _microbatches(groups):
    from megatron.core import parallel_state as ps

    from megatron_gift.algo.packing import pack_microbatches, shard_groups

    mine = shard_groups(groups, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    mbs = pack_microbatches(mine, num_microbatches=2, uniform_length=True)
    for mb in mbs:  # fixed synthetic anchors: the loss depends on the policy's log-probs only
        mb.loss_inputs.anchor_logprobs = mb.rollout_logprobs.clone()
    return mbs


def _steps(schedule, optimizer, scheduler, mbs, n):
    losses = []
    for _ in range(n):
        losses.append(schedule.train_step(mbs, optimizer).values()["loss"])
        scheduler.step(1)
    return losses


def _save(ddp, optimizer, scheduler, ckpt: str):
    import torch.distributed as dist

    from megatron_gift.mcore import dist_ckpt

    if dist.get_rank() == 0:
        Path(ckpt).mkdir(parents=True)
    dist.barrier()
    dist_ckpt.save_training_state(ddp, optimizer, {"gift": {"scheduler": scheduler.state_dict()}}, Path(ckpt))


def _allow_children() -> None:
    """Megatron's checkpoint writer starts helper processes (a multiprocessing Manager for its results
    queue), which Python refuses inside the harness's daemonic rank processes. Clearing this rank's daemon
    flag lets it have children; the harness still terminates the rank itself on failure."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False


def _run(rank, world_size, groups, ckpt_root, save: bool, kinds=(False, True)):
    """For each optimizer kind: save (one process) or load + re-save; then two more steps' losses."""
    from megatron_gift.mcore import dist_ckpt

    _allow_children()
    try:
        return _run_kinds(groups, ckpt_root, save, kinds)
    finally:
        dist_ckpt.shutdown_writer_helpers()  # the rank is daemonic: its helpers would outlive it


def _refused(rank, world_size):
    """The set-up whose checkpoints megatron-core writes wrongly is refused (its message), else None."""
    from megatron_gift.mcore import dist_ckpt

    ddp, optimizer, _, _ = _setup(distopt=True)
    try:
        dist_ckpt.check_checkpointable(ddp, optimizer)
    except NotImplementedError as exc:
        return str(exc)
    return None


def _run_kinds(groups, ckpt_root, save, kinds):
    from megatron_gift.mcore import dist_ckpt

    out = {}
    for distopt in kinds:
        ddp, optimizer, scheduler, schedule = _setup(distopt)
        mbs = _microbatches(groups)
        ckpt = f"{ckpt_root}/opt{int(distopt)}"
        if save:
            _steps(schedule, optimizer, scheduler, mbs, 2)
            _save(ddp, optimizer, scheduler, ckpt)
        else:
            plain = dist_ckpt.load_training_state(ddp, optimizer, Path(ckpt))
            scheduler.load_state_dict(plain["gift"]["scheduler"])
            _save(ddp, optimizer, scheduler, f"{ckpt}_resaved")
        out[distopt] = _steps(schedule, optimizer, scheduler, mbs, 2)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    groups = make_groups(n_groups=4, size=4, seed=5)
    losses = run_distributed(_run, 1, groups=groups, ckpt_root=str(root / "single"), save=True)[0]
    return root, groups, losses


def test_distributed_optimizer_with_pipeline_and_tied_embeddings_is_refused():
    messages = run_distributed(_refused, 2, pp=2)
    assert all(m is not None and "tied embeddings" in m for m in messages)
    assert run_distributed(_refused, 1) == [None]


# PP=2 with the distributed optimizer is refused (tied embeddings: see dist_ckpt.check_checkpointable).
@pytest.mark.parametrize("layout,kinds", [({"tp": 2}, (False, True)), ({"pp": 2}, (False,)), ({}, (False, True))],
                         ids=["tp2", "pp2", "dp2"])
def test_resume_under_another_layout(saved, layout, kinds):
    from megatron_gift.mcore.dist_ckpt import canonical_checkpoint_tensors

    root, groups, reference = saved
    name = "_".join(f"{k}{v}" for k, v in layout.items()) or "dp2"
    target = root / name
    for distopt in kinds:  # the run loads from a per-layout copy of the single-process checkpoint
        shutil.copytree(root / "single" / f"opt{int(distopt)}", target / f"opt{int(distopt)}")
    results = run_distributed(_run, 2, **layout, groups=groups, ckpt_root=str(target), save=False, kinds=kinds)
    for distopt in kinds:
        original = canonical_checkpoint_tensors(target / f"opt{int(distopt)}")
        resaved = canonical_checkpoint_tensors(target / f"opt{int(distopt)}_resaved")
        assert original.keys() == resaved.keys() and len(original) > 10
        assert any("exp_avg_sq" in k for k in original)
        differ = [k for k in original if not torch.equal(original[k], resaved[k])]
        assert not differ, f"{name}, distributed optimizer={distopt}: re-saved tensors differ: {differ[:5]}"
        for r in results:  # every rank reports the same (globally reduced) losses
            assert r[distopt] == pytest.approx(reference[distopt], rel=RTOL), (name, distopt, r[distopt],
                                                                                reference[distopt])
    assert reference[False][1] != reference[False][0]  # the steps really train
