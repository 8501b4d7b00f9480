"""Per-update diagnostics (issue 17): with several updates per rollout batch every update's loss, pre-clip
grad norm and GIFT statistics are logged under update{k}/, the plain keys keep the last update's values."""
from types import SimpleNamespace

import torch

from megatron_gift.trainer.report import per_update_metrics


def _trainer(updates, results):
    from megatron_gift.trainer.trainer import PhaseTimer, Trainer
    t = Trainer.__new__(Trainer)  # the phases are stubs: only train_step's bookkeeping is under test
    t.cfg = SimpleNamespace(trainer=SimpleNamespace(updates_per_rollout=updates,
                                                    dynamic_sampling=SimpleNamespace(enabled=False)),
                            optim=SimpleNamespace(fp16=False))
    t.engine = SimpleNamespace(supports_sleep=False, sleep=lambda: None, wake=lambda: None)
    t.ft = SimpleNamespace(heartbeat=lambda: None)
    t.timed = PhaseTimer(t.ft)
    t.step = 0
    group = SimpleNamespace(rewards=torch.tensor([1.0, 0.0]))
    t.sample_prompts = lambda: []
    t.generate_and_score = lambda batch: ([group] * updates, None)
    t.pack = lambda groups: ["mb"]
    t.anchor = lambda mbs: None
    it = iter(results)

    def train(mbs):
        vals, norm = next(it)
        return SimpleNamespace(values=lambda: dict(vals), grad_norm=torch.tensor(norm)), 0
    t.train = train
    t.sync_weights = lambda: None
    t._step_metrics = lambda values, rewards, stats, wall: dict(values)
    return t


def test_every_update_is_logged_under_its_index():
    results = [({"loss": 0.5, "rho": 0.0, "tiny_implicit_std_frac": 1.0}, 3.0e6),
               ({"loss": 0.25, "rho": 0.4, "tiny_implicit_std_frac": 0.0}, 2.0),
               ({"loss": 0.125, "rho": 0.6, "tiny_implicit_std_frac": 0.0}, 1.5)]
    values = _trainer(3, results).train_step()
    assert values["update0/grad_norm"] == 3.0e6 and values["update1/grad_norm"] == 2.0
    assert [values[f"update{u}/loss"] for u in range(3)] == [0.5, 0.25, 0.125]
    assert [values[f"update{u}/rho"] for u in range(3)] == [0.0, 0.4, 0.6]
    assert values["update0/tiny_implicit_std_frac"] == 1.0 and values["update2/tiny_implicit_std_frac"] == 0.0
    assert values["loss"] == 0.125 and values["grad_norm"] == 1.5  # plain keys: the last update


def test_one_update_per_rollout_adds_no_per_update_keys():
    values = _trainer(1, [({"loss": 0.5}, 2.0)]).train_step()
    assert not any(k.startswith("update") for k in values) and values["grad_norm"] == 2.0


def test_only_known_diagnostics_are_copied():
    assert per_update_metrics(1, {"loss": 1.0, "lr": 3e-6, "clip_frac": 0.1}) == {
        "update1/loss": 1.0, "update1/clip_frac": 0.1}
