"""megatron-gift-plot: metric patterns expand to one line per matching key, and runs with per-update
diagnostics get the per-update panels by default."""
import json

from megatron_gift.cli import plot


def _rows(per_update: bool):
    rows = []
    for step in range(1, 4):
        row = {"step": step, "reward_mean": 0.1 * step, "loss": 1.0 / step}
        if per_update:
            for k in range(12):
                row[f"update{k}/grad_norm"] = 1e6 if k == 0 else 10.0
                row[f"update{k}/loss"] = 0.5
        rows.append(row)
    return rows


def test_patterns_expand_in_update_order():
    rows = _rows(True)
    assert plot._keys(rows, "update*/grad_norm") == [f"update{k}/grad_norm" for k in range(12)]
    assert plot._keys(rows, "reward_mean") == ["reward_mean"]
    assert plot._keys(rows, "nothing*") == []


def test_per_update_panels_only_when_logged(tmp_path):
    assert plot.default_metrics([_rows(False)]) == ["reward_mean", "loss"]
    assert plot.default_metrics([_rows(False), _rows(True)]) == ["reward_mean", "loss", "update*/grad_norm",
                                                                 "update*/loss"]
    for name, per_update in (("a", True), ("b", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(per_update)))
    out = plot.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert plot.main([str(tmp_path / "a"), "--out", str(tmp_path / "d.png"), "--metrics", "update*/grad_norm"]) == 0
    assert out == str(tmp_path / "c.png") and (tmp_path / "d.png").exists()
