"""The trainer's throughput rules: engine sleep / wake order in a step, anchor elision, the microbatch rule."""
from types import SimpleNamespace

import pytest
import torch

from megatron_gift.trainer.throughput import microbatch_rule, self_anchored, sleep_note


class _Engine:
    def __init__(self, calls, sleeps):
        self.calls, self.supports_sleep = calls, sleeps
        self.config = SimpleNamespace(sleep_level=1)

    def sleep(self):
        self.calls.append("sleep")

    def wake(self):
        self.calls.append("wake")


def _recording_trainer(calls, sleeps, updates=1):
    from megatron_gift.trainer.trainer import Trainer
    t = Trainer.__new__(Trainer)  # the phases are stubs: only train_step's order is under test
    from megatron_gift.trainer.trainer import PhaseTimer
    t.cfg = SimpleNamespace(trainer=SimpleNamespace(updates_per_rollout=updates,
                                                    dynamic_sampling=SimpleNamespace(enabled=False)),
                            optim=SimpleNamespace(fp16=False))
    t.engine = _Engine(calls, sleeps)
    t.ft = SimpleNamespace(heartbeat=lambda: None)
    t.timed = PhaseTimer(t.ft)
    t.step = 0
    group = SimpleNamespace(rewards=torch.tensor([1.0, 0.0]))
    t.sample_prompts = lambda: calls.append("sample") or []
    t.generate_and_score = lambda batch: calls.append("generate") or ([group] * 2, None)
    t.pack = lambda groups: calls.append("pack") or ["mb"]
    t.anchor = lambda mbs: calls.append("anchor")
    t.train = lambda mbs: calls.append("train") or (SimpleNamespace(values=lambda: {"loss": 0.0}, grad_norm=None), 0)
    t.sync_weights = lambda: calls.append("sync_weights")
    t._step_metrics = lambda values, rewards, stats, wall: dict(values)
    return t


@pytest.mark.parametrize("sleeps", [True, False], ids=["gpu_sleep", "cpu_noop"])
def test_engine_sleeps_for_the_train_phase_and_wakes_before_the_weight_push(sleeps):
    calls = []
    trainer = _recording_trainer(calls, sleeps, updates=2)
    trainer.train_step()
    assert calls == ["sample", "generate", "sleep", "pack", "pack", "anchor", "anchor", "train", "train", "wake",
                     "sync_weights"]
    assert ("sleep" in trainer.timed.seconds and "wake" in trainer.timed.seconds) == sleeps  # timed only where it acts
    assert "no-ops" in sleep_note(_Engine([], False)) and "level 1" in sleep_note(_Engine([], True))


def test_anchor_comes_from_the_train_pass_only_when_it_is_the_policy_itself():
    from megatron_gift.algo import build_loss
    one, four = SimpleNamespace(updates_per_rollout=1), SimpleNamespace(updates_per_rollout=4)
    assert self_anchored(build_loss("gift", {"anchor": "old"}), one)
    assert self_anchored(build_loss("grpo", {}), one)
    assert not self_anchored(build_loss("gift", {"anchor": "old"}), four)  # later updates: the policy moved
    assert not self_anchored(build_loss("gift", {"anchor": "ref"}), one)


def test_microbatch_rule_from_the_config():
    from megatron_gift.config.schema import TrainerConfig
    par = SimpleNamespace(tp=2, pp=2, cp=1, vpp=None)
    assert microbatch_rule(TrainerConfig(microbatches=4), par) == dict(
        num_microbatches=4, uniform_length=True, packed=None, pad_to_multiple=8)
    rule = microbatch_rule(TrainerConfig(max_tokens_per_microbatch=4096, packing="thd"),
                           SimpleNamespace(tp=8, pp=1, cp=2, vpp=None))
    assert rule == dict(max_tokens=4096, packed="thd", pad_to_multiple=32, count_multiple=1)
    assert microbatch_rule(TrainerConfig(max_tokens_per_microbatch=64), SimpleNamespace(tp=1, pp=4, cp=1, vpp=2)) == \
        dict(max_tokens=64, packed=None, pad_to_multiple=8, count_multiple=4)
    with pytest.raises(ValueError, match="leave trainer.microbatches at 1"):
        TrainerConfig(max_tokens_per_microbatch=4096, microbatches=2)
    with pytest.raises(ValueError, match="trainer.packing must be"):
        TrainerConfig(packing="bshd")


def test_rollout_anchor_source_takes_the_engine_log_probs():
    from megatron_gift.algo.packing import RolloutGroup, pack_microbatches
    from megatron_gift.config.run import LossConfig
    from megatron_gift.trainer.throughput import fill_rollout_anchor
    groups = [RolloutGroup(0, torch.tensor([3, 4]), [torch.tensor([5, 6]), torch.tensor([7])], torch.tensor([1.0, 0.0]),
                           [torch.tensor([-0.5, -1.5]), torch.tensor([-2.0])])]
    (mb,) = pack_microbatches(groups, max_tokens=64, packed="rows")
    fill_rollout_anchor([mb])
    m = mb.loss_inputs.mask.bool()
    assert mb.loss_inputs.anchor_logprobs[m].tolist() == [-0.5, -1.5, -2.0]
    assert not self_anchored(SimpleNamespace(anchor="old"), SimpleNamespace(updates_per_rollout=1), "rollout")
    groups[0].rollout_logprobs = None
    (mb,) = pack_microbatches(groups, num_microbatches=1)
    with pytest.raises(ValueError, match="anchor_source: rollout needs"):
        fill_rollout_anchor([mb])
    assert LossConfig(name="gift", options={"anchor": "old"}, anchor_source="rollout").anchor_source == "rollout"
    with pytest.raises(ValueError, match="has anchor 'ref'"):
        LossConfig(name="gift", options={"anchor": "ref"}, anchor_source="rollout")
    with pytest.raises(ValueError, match="loss.anchor_source must be"):
        LossConfig(anchor_source="engine")


def test_packing_with_context_parallelism_is_refused_before_training():
    from megatron_gift.config.run import run_config_from_dict
    base = {"model": {"hf_dir": "/x"}, "data": {"path": "/x/train.jsonl"}}
    cfg = run_config_from_dict({**base, "trainer": {"packing": "rows"}, "parallel": {"cp": 2}})
    with pytest.raises(ValueError, match="trainer.packing='rows' with parallel.cp=2 is not supported"):
        cfg.check_world(2)
    run_config_from_dict({**base, "trainer": {"packing": "rows"}}).check_world(2)  # CP 1: fine
