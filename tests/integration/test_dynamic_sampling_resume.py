"""Dynamic sampling keeps resume exact: a DAPO run with refills, killed (SIGKILL, whole process group) right
after step 3's log line, i.e. inside step 4's rollout / refill, and resumed from its step-2 checkpoint ends
bitwise equal to the uninterrupted run (every checkpoint tensor, the sampler position, metrics.jsonl without
timings). The refill draws from the checkpointed prompt sampler and keeps nothing across steps.
Runtime: three trainer start-ups (~2 minutes on 2 cores)."""
from __future__ import annotations

import signal

import pytest
import torch

from tests.integration.resume_helpers import (checkpoint_plain, checkpoint_tensors, make_warm_model, metrics_rows,
                                              run_overrides, run_train, run_until)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
STEPS = 4
DAPO = ["loss.name=dapo", "loss.options={}", "trainer.dynamic_sampling.enabled=true",
        "trainer.dynamic_sampling.max_rounds=3", "trainer.eval_every=0"]


def test_kill9_during_a_refill_resumes_bitwise(tmp_path_factory):
    warm = make_warm_model(tmp_path_factory.mktemp("warm"))
    ref_dir = tmp_path_factory.mktemp("reference") / "run"
    ref = run_train(run_overrides(warm, ref_dir, STEPS, extra=DAPO))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-5000:]
    ref_rows = metrics_rows(ref_dir)
    assert any(r.get("dynamic_sampling/rounds", 1) > 1 for r in ref_rows), ref_rows  # refills happened

    run_dir = tmp_path_factory.mktemp("killed") / "run"
    overrides = run_overrides(warm, run_dir, STEPS, extra=DAPO)
    killed = run_until(overrides, f"[train] step 3/{STEPS}", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_train(overrides)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout

    final = f"step_{STEPS:08d}"
    a, b = checkpoint_tensors(run_dir / "checkpoints" / final), checkpoint_tensors(ref_dir / "checkpoints" / final)
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    pa, pb = checkpoint_plain(run_dir / "checkpoints" / final), checkpoint_plain(ref_dir / "checkpoints" / final)
    assert pa["gift"]["sampler"] == pb["gift"]["sampler"]
    assert pa["gift"]["sampler"]["position"] + 64 * pa["gift"]["sampler"]["epoch"] > STEPS * 4  # refills drew more
    assert metrics_rows(run_dir) == ref_rows
