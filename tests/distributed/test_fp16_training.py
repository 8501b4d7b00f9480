"""precision.dtype float16: Float16Module + Megatron's fp16 optimizer with dynamic loss scaling.

A few GIFT optimizer steps of the tiny GPT in fp16 track the float32 run from the same weights (fp32 main
weights, scaled loss, unscaled gradients); a first scale that overflows fp16 gradients (2^16) skips steps and
backs off, as dynamic scaling must; and the loss scaler's state goes through a training checkpoint and back.
Measured: 3 skipped steps (scale 2^16 -> 2^13), then losses within 3e-4 relative of the float32 run."""
from __future__ import annotations

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups
from tests.distributed.tiny_gpt import VOCAB, _build_model, _config


def _fp16_vs_fp32(rank, world_size, groups, steps, ckpt_dir):
    import dataclasses

    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches
    from megatron_gift.mcore import dist_ckpt
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    pg = ProcessGroupCollection.use_mpu_process_groups()
    fp32_model = _build_model(_config())
    weights = {k: v.clone() for k, v in fp32_model.state_dict().items() if isinstance(v, torch.Tensor)}
    mbs = pack_microbatches(groups, num_microbatches=2)

    def run(model, settings):
        ddp = wrap_for_training([model], settings)
        optimizer, scheduler = build_optimizer(ddp, settings)
        schedule = GiftSchedule(ddp, build_loss("gift", {"anchor": "old"}), ScheduleSettings(vocab_size=VOCAB), pg)
        # Anchors: the groups' synthetic rollout log-probs, so h has a spread from the first step (anchored
        # to the policy itself, step 0 has implicit std 0 and coefficients ~ 1/eps, beyond fp16's range).
        out = {"loss": [], "ok": [], "scale": []}
        for _ in range(steps):
            result = schedule.train_step(mbs, optimizer)
            scheduler.step(1)
            out["loss"].append(result.values()["loss"])
            out["ok"].append(result.update_successful)
            out["scale"].append(float(optimizer.get_loss_scale()))
        return ddp, optimizer, out

    base = OptimSettings(lr=3e-3, clip_grad=1.0)
    _, _, ref = run(fp32_model, base)
    half_cfg = dataclasses.replace(_config(), params_dtype=torch.float16, pipeline_dtype=torch.float16, fp16=True)
    half = _build_model(half_cfg)
    half.load_state_dict(weights, strict=False)
    fp16 = dataclasses.replace(base, fp16=True, initial_loss_scale=2.0 ** 16, hysteresis=1)
    ddp, optimizer, out = run(half, fp16)
    scaler = optimizer.state_dict()["grad_scaler"]
    if ckpt_dir is None:
        return dict(ref=ref, fp16=out, scaler=scaler)
    dist_ckpt.save_training_state(ddp, optimizer, {"marker": 1}, ckpt_dir)
    fresh = _build_model(half_cfg)
    ddp2 = wrap_for_training([fresh], fp16)
    optimizer2, _ = build_optimizer(ddp2, fp16)
    before = float(optimizer2.get_loss_scale())
    dist_ckpt.load_training_state(ddp2, optimizer2, ckpt_dir)
    return dict(ref=ref, fp16=out, scaler=scaler, restored=optimizer2.state_dict()["grad_scaler"], before=before,
                dtype=str(next(half.parameters()).dtype))


@pytest.mark.distributed
def test_fp16_steps_track_fp32_and_the_loss_scaler_is_checkpointed(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = run_distributed(_fp16_vs_fp32, 1, groups=make_groups(n_groups=4, size=4, seed=3), steps=8,
                          ckpt_dir=ckpt)[0]
    ref, half = out["ref"], out["fp16"]
    assert out["dtype"] == "torch.float16"
    assert all(ref["ok"])
    # 2^16 overflows fp16 gradients: those steps are skipped and the scale halves until it fits.
    skipped = half["ok"].index(True)
    assert skipped > 0 and not any(half["ok"][:skipped]) and all(half["ok"][skipped:]), half
    assert half["scale"][skipped - 1] == 2.0 ** (16 - skipped) and half["scale"][-1] == half["scale"][skipped - 1]
    # After the skipped steps fp16 takes the fp32 run's steps: same losses to fp16 accuracy.
    compared = len(half["loss"]) - skipped
    assert compared >= 4 and ref["loss"][compared - 1] < 0.7 * ref["loss"][0]  # the compared steps train
    for a, b in zip(half["loss"][skipped:], ref["loss"]):
        assert abs(a - b) < 2e-3 * abs(b), (half["loss"], ref["loss"])
    assert out["before"] == 2.0 ** 16
    assert float(out["restored"]["scale"]) == float(out["scaler"]["scale"]) == half["scale"][-1]
    assert out["restored"]["growth_tracker"] == out["scaler"]["growth_tracker"]
