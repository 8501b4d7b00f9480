"""benchmarks/gift_study.py's bookkeeping: runs of both update structures land on one update axis, the per-update
diagnostics are read per update index, the permutation test is exact, and the grid is what issue 17 asks."""
import itertools
import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gift_study  # noqa: E402


def _write_run(run_dir: Path, rewards, u: int, evals=()):
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "eval/reward_mean": 0.1}]
    for i, r in enumerate(rewards):
        row = {"step": i + 1, "reward_mean": r, "grad_norm": 7.0, "loss": 0.5, "rho": 0.2}
        for k in range(u if u > 1 else 0):
            row.update({f"update{k}/grad_norm": 1e6 if k == 0 else 10.0 * k + i, f"update{k}/loss": float(k),
                        f"update{k}/rho": 0.1 * k})
        rows.append(row)
    for step, v in evals:
        rows.append({"step": step, "eval/reward_mean": v})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_both_structures_land_on_the_update_axis(tmp_path):
    # u1: 16 prompts a step -> smoothing over 4 steps, final over the last 8 steps; reward after k updates at x = k
    _write_run(tmp_path / "a", [0.0, 0.0, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4], 1, evals=[(10, 0.3)])
    s = gift_study.summarize(tmp_path / "a", 1, threshold=0.3)
    assert s["x"] == list(range(10))
    assert s["curve"][3] == pytest.approx(0.2) and s["curve"][4] == pytest.approx(0.3)
    assert s["updates_to_threshold"] == 4 and s["final_train"] == pytest.approx(0.4)
    assert (s["start_eval"], s["final_eval"]) == (0.1, 0.3) and s["eval_curve"] == [(0, 0.1), (10, 0.3)]
    assert s["grad_norm_by_update"] == [7.0]
    # u4: 64 prompts a step -> no smoothing, final over the last 2 steps, x = 4 (step - 1); eval step 3 -> 12 updates
    _write_run(tmp_path / "b", [0.1, 0.2, 0.35, 0.5], 4, evals=[(3, 0.2)])
    s = gift_study.summarize(tmp_path / "b", 4, threshold=0.3)
    assert s["x"] == [0, 4, 8, 12] and s["curve"] == [0.1, 0.2, 0.35, 0.5]
    assert s["updates_to_threshold"] == 8 and s["final_train"] == pytest.approx(0.425)
    assert s["eval_curve"][-1] == (12, 0.2)
    # median over the 4 rollout steps at each update index: update 1 had 10, 11, 12, 13
    assert s["grad_norm_by_update"] == [1e6, 11.5, 21.5, 31.5]
    assert s["loss_by_update"] == [0.0, 1.0, 2.0, 3.0]


def test_permutation_p_is_exact_against_brute_force():
    a, b = [0.31, 0.42, 0.29, 0.5, 0.47], [0.2, 0.25, 0.33, 0.18, 0.3]
    pooled = a + b
    obs = abs(statistics.fmean(a) - statistics.fmean(b))
    count = 0
    for idx in itertools.combinations(range(10), 5):
        xa = [pooled[i] for i in idx]
        xb = [pooled[i] for i in range(10) if i not in idx]
        count += abs(statistics.fmean(xa) - statistics.fmean(xb)) >= obs - 1e-12
    assert gift_study.permutation_p(a, b) == pytest.approx(count / 252)
    assert gift_study.permutation_p(a, b) < 0.05  # fully separated but for one pair: few relabellings beat it
    assert gift_study.permutation_p([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert gift_study.permutation_p([1.0], [2.0, 3.0]) is None


def test_grid_is_the_issue_17_design():
    names = [gift_study.cell_name(c) for c in gift_study.grid()]
    assert len(names) == len(set(names)) == 12
    for s in ("u1", "u4"):
        for loss in ("grpo", "gift_old", "gift_old_full", "gift_ref"):
            assert f"{s}/{loss}" in names
    assert {"u4/grpo_lr0.3x", "u4/grpo_lr3x", "u4/gift_old_lr0.3x", "u4/gift_old_lr3x"} <= set(names)
    sets = gift_study.cell_overrides(("gift_old", "u4", 3.0), 3e-4, 64)
    assert {"trainer.updates_per_rollout=4", "trainer.prompts_per_step=64", "optim.lr=0.0009",
            "trainer.steps=16", "trainer.eval_every=4", "data.max_prompts=64"} == set(sets)
