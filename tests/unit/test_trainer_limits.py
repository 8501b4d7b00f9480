"""Settings that used to be accepted and then ignored: each is now refused (or checked) before any work."""
import pytest

from megatron_gift.config.run import run_config_from_dict

BASE = {"model": {"hf_dir": "/nonexistent"}, "data": {"path": "/nonexistent/train.jsonl"}}


def test_prompts_not_divisible_by_updates_is_refused_when_the_config_loads():
    """10 prompts in 4 updates: groups 8-9 were generated, scored, counted in reward_mean and never trained on."""
    with pytest.raises(ValueError, match=r"trainer.prompts_per_step=10 must be divisible by "
                                         r"trainer.updates_per_rollout=4"):
        run_config_from_dict({**BASE, "trainer": {"prompts_per_step": 10, "updates_per_rollout": 4}})
    cfg = run_config_from_dict({**BASE, "trainer": {"prompts_per_step": 12, "updates_per_rollout": 4}})
    assert cfg.check_world(1) == 1
    cfg.trainer.prompts_per_step = 10  # changed after loading: the trainer's start-up check still names it
    with pytest.raises(ValueError, match=r"trainer.prompts_per_step=10 must be divisible by trainer.updates_per"):
        cfg.check_world(1)


def test_replica_share_per_update_must_be_whole_groups():
    """12 prompts, 2 updates, DP=4: 6 groups per update do not split over 4 replicas."""
    cfg = run_config_from_dict({**BASE, "trainer": {"prompts_per_step": 12, "updates_per_rollout": 2}})
    assert cfg.check_world(2) == 2 and cfg.check_world(3) == 3
    with pytest.raises(ValueError, match=r"6 prompt groups per optimizer step .* 4 data-parallel ranks x 1 "
                                         r"microbatches \(trainer.prompts_per_step=12 / trainer.updates_per_rollout=2"):
        cfg.check_world(4)


def test_trainer_refuses_vpp_before_starting():
    from megatron_gift.trainer.trainer import Trainer
    cfg = run_config_from_dict({**BASE, "parallel": {"pp": 2, "vpp": 2}})
    with pytest.raises(ValueError, match=r"parallel.vpp=2: the trainer builds one model chunk"):
        Trainer(cfg)


def test_vpp_one_passes_the_trainer_check_and_optim_precision_follows_precision_dtype():
    from megatron_gift.trainer.limits import check_trainer_supports
    check_trainer_supports(run_config_from_dict({**BASE, "parallel": {"pp": 2, "vpp": 1}}))
    check_trainer_supports(run_config_from_dict({**BASE, "precision": {"dtype": "float16"}, "optim": {"fp16": True}}))
    with pytest.raises(ValueError, match=r"optim.fp16=true with precision.dtype=float32: .*precision.dtype=float16"):
        check_trainer_supports(run_config_from_dict({**BASE, "optim": {"fp16": True}}))


def test_fp16_optimizer_settings():
    """precision.dtype float16 trains with Megatron's fp16 optimizer (tests/distributed/test_fp16_training.py)."""
    from megatron_gift.mcore.training import OptimSettings
    import torch
    assert OptimSettings(fp16=True).params_dtype is torch.float16 and OptimSettings().params_dtype is torch.float32
    with pytest.raises(ValueError, match="optim.loss_scale must be > 0"):
        OptimSettings(fp16=True, loss_scale=0.0)
    with pytest.raises(ValueError, match="min_loss_scale <= initial_loss_scale"):
        OptimSettings(fp16=True, min_loss_scale=4.0, initial_loss_scale=2.0)
    with pytest.raises(ValueError, match="bf16 and fp16 are exclusive"):
        OptimSettings(bf16=True, fp16=True)


def test_an_overflowing_fp16_update_is_redone_until_it_fits_and_an_error_at_the_floor():
    from types import SimpleNamespace

    from megatron_gift.mcore.training import OptimSettings, step_until_no_overflow

    class Scaler:  # what Megatron's optimizer does on overflow: skip the update and halve the scale
        def __init__(self, scale, fits_below):
            self.scale, self.fits_below, self.calls = scale, fits_below, 0

        def get_loss_scale(self):
            return self.scale

        def step(self):
            self.calls += 1
            ok = self.scale <= self.fits_below
            if not ok:
                self.scale /= 2
            return SimpleNamespace(update_successful=ok)

    opt = Scaler(2.0 ** 16, fits_below=2.0 ** -3)
    result, redone = step_until_no_overflow(opt.step, opt, OptimSettings(fp16=True))
    assert result.update_successful and redone == 19 and opt.calls == 20 and opt.scale == 2.0 ** -3
    opt = Scaler(2.0 ** 16, fits_below=2.0 ** -3)
    with pytest.raises(FloatingPointError, match=r"not finite at loss scale 1 .*optim.min_loss_scale=1"):
        step_until_no_overflow(opt.step, opt, OptimSettings(fp16=True, min_loss_scale=1.0))
    opt = Scaler(8.0, fits_below=1.0)
    with pytest.raises(FloatingPointError, match=r"optim.loss_scale=8.0"):  # a static scale is not lowered
        step_until_no_overflow(opt.step, opt, OptimSettings(fp16=True, loss_scale=8.0))
    opt = Scaler(8.0, fits_below=1.0)  # bf16 / fp32: a skipped update is not redone
    assert step_until_no_overflow(opt.step, opt, OptimSettings())[1] == 0 and opt.calls == 1
