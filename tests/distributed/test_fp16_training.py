"""precision.dtype float16: Float16Module + Megatron's fp16 optimizer with dynamic loss scaling.

GIFT optimizer steps of the tiny GPT in fp16, each overflowing update redone on the same batch at the halved
scale (mcore/training.py step_until_no_overflow, what the trainer runs), track the float32 run from the same
weights: with anchors that differ from the policy (losses step for step), and anchored to the policy itself,
the trainer's anchor `old` case whose coefficients ~ 1/eps fit fp16 only at scales far below 1 (the weight
updates). The loss scaler's state goes through a training checkpoint and back.
Measured: anchors apart: 3 redone updates (2^16 -> 2^13), losses within 3e-4 relative of float32, log-probs
after 5 steps within 0.3% of how far training moved them; self-anchored: 26 redone updates (-> 2^-10),
log-probs after 3 steps within 0.3% likewise."""
from __future__ import annotations

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups
from tests.distributed.tiny_gpt import VOCAB, _build_model, _config


def _fp16_vs_fp32(rank, world_size, groups, steps, self_anchored, ckpt_dir):
    import dataclasses

    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches
    from megatron_gift.mcore import dist_ckpt
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, step_until_no_overflow, wrap_for_training

    pg = ProcessGroupCollection.use_mpu_process_groups()
    fp32_model = _build_model(_config())
    weights = {k: v.clone() for k, v in fp32_model.state_dict().items() if isinstance(v, torch.Tensor)}

    def run(model, settings):
        ddp = wrap_for_training([model], settings)
        optimizer, scheduler = build_optimizer(ddp, settings)
        schedule = GiftSchedule(ddp, build_loss("gift", {"anchor": "old"}), ScheduleSettings(vocab_size=VOCAB), pg)
        # Anchors: the groups' synthetic rollout log-probs (h has a spread), or the policy before each update.
        mbs = pack_microbatches(groups, num_microbatches=2)
        out = {"loss": [], "redone": [], "scale": [], "start": _logprobs(schedule, ddp, mbs)}
        for _ in range(steps):
            if self_anchored:
                schedule.fill_anchor_logprobs(ddp, mbs)
            result, redone = step_until_no_overflow(lambda: schedule.train_step(mbs, optimizer), optimizer, settings)
            scheduler.step(1)
            out["loss"].append(result.values()["loss"])
            out["redone"].append(redone)
            out["scale"].append(float(optimizer.get_loss_scale()))
        out["end"] = _logprobs(schedule, ddp, mbs)
        return ddp, optimizer, out

    base = OptimSettings(lr=3e-3, clip_grad=1.0)
    _, _, ref = run(fp32_model, base)
    half_cfg = dataclasses.replace(_config(), params_dtype=torch.float16, pipeline_dtype=torch.float16, fp16=True)
    half = _build_model(half_cfg)
    half.load_state_dict(weights, strict=False)
    fp16 = dataclasses.replace(base, fp16=True)
    ddp, optimizer, out = run(half, fp16)
    # How far the fp16 run's sampled-token log-probs end from float32's, relative to how far training moved them.
    moved = float((ref["end"] - ref["start"]).abs().max())
    result = dict(ref=ref["loss"], fp16=out, update_error=float((out["end"] - ref["end"]).abs().max()) / moved,
                  moved=moved, dtype=str(next(half.parameters()).dtype))
    if ckpt_dir is not None:
        result["scaler"] = optimizer.state_dict()["grad_scaler"]
        dist_ckpt.save_training_state(ddp, optimizer, {"marker": 1}, ckpt_dir)
        ddp2 = wrap_for_training([_build_model(half_cfg)], fp16)
        optimizer2, _ = build_optimizer(ddp2, fp16)
        result["before"] = float(optimizer2.get_loss_scale())
        dist_ckpt.load_training_state(ddp2, optimizer2, ckpt_dir)
        result["restored"] = optimizer2.state_dict()["grad_scaler"]
    return result


def _logprobs(schedule, model, mbs):
    return torch.cat([(lp * mb.loss_inputs.mask).flatten() for mb, lp in zip(mbs, schedule.compute_logprobs(model, mbs))])


@pytest.mark.distributed
def test_fp16_steps_track_fp32_and_the_loss_scaler_is_checkpointed(tmp_path):
    out = run_distributed(_fp16_vs_fp32, 1, groups=make_groups(n_groups=4, size=4, seed=3), steps=5,
                          self_anchored=False, ckpt_dir=tmp_path)[0]
    half = out["fp16"]
    assert out["dtype"] == "torch.float16"
    # 2^16 overflows fp16 gradients: the first update is redone at halved scales until it fits (2^13).
    assert half["redone"] == [3, 0, 0, 0, 0] and half["scale"] == [2.0 ** 13] * 5, half
    assert out["ref"][-1] < 0.7 * out["ref"][0]  # the compared steps train
    for a, b in zip(half["loss"], out["ref"]):
        assert abs(a - b) < 2e-3 * abs(b), (half["loss"], out["ref"])
    assert out["update_error"] < 0.02, (out["update_error"], out["moved"])
    print(f"fp16: redone {half['redone']}, log-prob error {out['update_error']:.2e} of the {out['moved']:.3f} "
          f"training moved them")
    assert out["before"] == 2.0 ** 16
    assert float(out["restored"]["scale"]) == float(out["scaler"]["scale"]) == 2.0 ** 13
    assert out["restored"]["growth_tracker"] == out["scaler"]["growth_tracker"] == 5


@pytest.mark.distributed
def test_fp16_self_anchored_updates_track_fp32():
    """Anchor `old` (the policy before the update): h = 0, coefficients ~ 1/eps; fp16 fits below scale 1."""
    out = run_distributed(_fp16_vs_fp32, 1, groups=make_groups(n_groups=4, size=4, seed=3), steps=3,
                          self_anchored=True, ckpt_dir=None)[0]
    half = out["fp16"]
    assert half["redone"][0] > 16 and half["scale"][0] < 1.0 and sum(half["redone"][1:]) <= 2, half
    assert out["update_error"] < 0.02, (out["update_error"], out["moved"])
    print(f"fp16 self-anchored: redone {half['redone']}, scale {half['scale'][-1]:g}, log-prob error "
          f"{out['update_error']:.2e} of the {out['moved']:.3f} training moved them")
