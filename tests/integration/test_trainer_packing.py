"""The trainer end to end with token-budget and packed microbatches equals the padded run step for step.

One warm start; three one-process runs of 3 steps (anchor `old`, one update per rollout, so the anchor
comes from the train pass in all three): padded microbatches by count, a token budget with packed rows,
and a token budget with one THD-style row (block mask on CPU). The same rollouts give the same rewards;
losses agree to 1e-5 and the trainer's log-probs match the engine's in every step."""
import pytest

from tests.integration.test_trainer_e2e import _common, _torchrun, shared_warm_start  # noqa: F401 (fixture)

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed]


def test_packed_and_budgeted_runs_equal_the_padded_run(shared_warm_start):  # noqa: F811
    sets, base = shared_warm_start
    padded, _ = _torchrun(base / "padded", 1, _common(base / "padded", steps=3) + sets, 29651)
    assert any(abs(r["loss"]) > 1e-3 for r in padded[1:]), padded
    for name, extra, port in (("rows", ["trainer.packing=rows"], 29653), ("thd", ["trainer.packing=thd"], 29655)):
        over = _common(base / name, steps=3) + sets + extra + ["trainer.microbatches=1",
                                                               "trainer.max_tokens_per_microbatch=160"]
        rows, _ = _torchrun(base / name, 1, over, port)
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        for mine, ref in zip(rows[1:], padded[1:]):
            assert mine["reward_mean"] == ref["reward_mean"], (name, mine, ref)
            assert abs(mine["loss"] - ref["loss"]) < 1e-5 * max(1.0, abs(ref["loss"])), (name, mine, ref)
            assert mine["logprob_mismatch_max"] < 1e-4, (name, mine)
            assert mine.get("time/anchor_s", 0.0) < 0.05, (name, mine)  # no anchor forward pass
