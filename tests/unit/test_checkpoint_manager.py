"""Checkpoint directories without torch.distributed: commit marker, retention, fallback, metadata checks.

Checkpoints here are directories of plain files written the way ranks write them (into begin()'s tmp dir);
what is inside does not matter to the manager. Runtime: < 1 s.
"""
from __future__ import annotations

import json

import pytest

from megatron_gift.hf.files import CheckpointError
from megatron_gift.checkpoint.manager import (
    MARKER,
    CheckpointManager,
    check_compatible,
    step_dir_name,
    verify,
)


def save(mgr: CheckpointManager, step: int, payload: bytes = b"x" * 100):
    tmp = mgr.begin(step)
    assert tmp.name == f"tmp.{step_dir_name(step)}" and list(tmp.iterdir()) == []
    (tmp / "model").mkdir()
    (tmp / "model" / "shard.distcp").write_bytes(payload)
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    return mgr.commit(tmp, step)


def names(d):
    return sorted(p.name for p in d.iterdir())


def test_commit_renames_and_marks_every_file_with_its_size(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, log=lambda m: None)
    final = save(mgr, 7, b"abc")
    assert final.name == "step_00000007" and names(tmp_path) == ["step_00000007"]  # no tmp left behind
    marker = json.loads((final / MARKER).read_text())
    assert marker["step"] == 7 and marker["files"] == {"meta.json": len(json.dumps({"step": 7})),
                                                       "model/shard.distcp": 3}
    assert verify(final) is None
    assert mgr.select("auto") == final


def test_retention_keeps_the_newest_k_complete_and_ignores_incomplete(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, log=lambda m: None)
    save(mgr, 1)
    (tmp_path / "tmp.step_00000009").mkdir()  # a save killed mid-way
    (tmp_path / "step_00000000").mkdir()      # a directory without marker: never counted, never deleted
    save(mgr, 2)
    assert names(tmp_path) == ["step_00000000", "step_00000001", "step_00000002", "tmp.step_00000009"]
    save(mgr, 3)  # a third complete one exists: step 1 goes, after step 3 is complete
    assert names(tmp_path) == ["step_00000000", "step_00000002", "step_00000003", "tmp.step_00000009"]


def test_auto_falls_back_past_missing_marker_and_truncated_file_and_deletes_nothing(tmp_path):
    logs = []
    mgr = CheckpointManager(tmp_path, keep_last=5, log=logs.append)
    for step in (2, 4, 6, 8):
        save(mgr, step)
    (tmp_path / "step_00000008" / MARKER).unlink()
    shard = tmp_path / "step_00000006" / "model" / "shard.distcp"
    shard.write_bytes(b"x" * 40)  # truncated
    (tmp_path / "step_00000004" / "meta.json").unlink()  # a listed file is gone
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    logs.clear()
    assert mgr.select("auto") == tmp_path / "step_00000002"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert len(logs) == 3
    assert "no completion marker" in logs[0] and "step_00000008" in logs[0]
    assert "40 bytes, the marker recorded 100" in logs[1]
    assert "meta.json listed in the marker is missing" in logs[2]


def test_auto_without_checkpoints_is_a_fresh_start_and_none_ignores_them(tmp_path):
    mgr = CheckpointManager(tmp_path / "absent", log=lambda m: None)
    assert mgr.select("auto") is None and mgr.select("none") is None


def test_explicit_path_must_be_complete_and_never_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5, log=lambda m: None)
    save(mgr, 2)
    broken = save(mgr, 4)
    (broken / MARKER).unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint: no completion marker"):
        mgr.select(str(broken))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        mgr.select(str(tmp_path / "nope"))


def test_starting_behind_complete_checkpoints_is_refused(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5, log=lambda m: None)
    older = save(mgr, 2)
    save(mgr, 4)
    with pytest.raises(CheckpointError, match=r"starts at step 2 .* newer complete checkpoints .*step_00000004"):
        mgr.select(str(older))
    with pytest.raises(CheckpointError, match=r"starts at step 0"):
        mgr.select("none")


def test_saving_over_an_invalid_step_dir_moves_it_aside_and_refuses_a_complete_one(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5, log=lambda m: None)
    bad = tmp_path / "step_00000003"
    (bad / "model").mkdir(parents=True)
    (bad / "model" / "keep.me").write_text("data")
    save(mgr, 3)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("step_00000003.invalid-")]
    assert len(aside) == 1 and (aside[0] / "model" / "keep.me").read_text() == "data"
    assert verify(tmp_path / "step_00000003") is None
    with pytest.raises(CheckpointError, match="already exists and is complete"):
        mgr.begin(3)


def test_stale_tmp_of_the_same_step_is_replaced(tmp_path):
    mgr = CheckpointManager(tmp_path, log=lambda m: None)
    stale = tmp_path / "tmp.step_00000005"
    stale.mkdir(parents=True)
    (stale / "half_written").write_text("x")
    final = save(mgr, 5)
    assert not stale.exists() and "half_written" not in [p.name for p in final.rglob("*")]


def test_metadata_mismatch_names_the_key_and_both_values(tmp_path):
    saved = {"model": {"hidden_size": 128, "num_layers": 2}, "loss": {"name": "gift"}}
    check_compatible(saved, {"model": {"hidden_size": 128, "num_layers": 2}, "loss": {"name": "gift"}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.hidden_size is 128 in the checkpoint but 256 in this run"):
        check_compatible(saved, {"model": {"hidden_size": 256, "num_layers": 2}, "loss": {"name": "gift"}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"loss\.name is 'gift' in the checkpoint but 'grpo'"):
        check_compatible(saved, {"model": {"hidden_size": 128, "num_layers": 2}, "loss": {"name": "grpo"}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"optim\.use_distributed_optimizer is '<absent>'"):
        check_compatible(saved, {**saved, "optim": {"use_distributed_optimizer": True}}, tmp_path)


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)


def _flip(path, offset: int) -> None:
    """Same size, one byte changed (bitwise inverted) at `offset`."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_same_size_damage_is_detected_named_and_skipped(tmp_path, capsys):
    import random

    from megatron_gift.checkpoint.__main__ import main as ckpt_cli

    messages = []
    mgr = CheckpointManager(tmp_path, keep_last=3, log=messages.append)
    save(mgr, 2, bytes(range(256)) * 40)
    newest = save(mgr, 4, bytes(range(256)) * 40)
    marker = json.loads((newest / MARKER).read_text())
    assert marker["checksums"].keys() == marker["files"].keys() and marker["checksum_algorithm"] == "xxh3_64"
    rng = random.Random(7)
    victim = newest / rng.choice(sorted(marker["files"]))
    _flip(victim, rng.randrange(victim.stat().st_size))
    rel = victim.relative_to(newest).as_posix()
    assert verify(newest) is None  # sizes alone do not see it
    assert rel in verify(newest, content=True)
    assert mgr.select("auto") == tmp_path / "step_00000002"
    assert any("skipping" in m and rel in m and "content changed" in m for m in messages), messages
    with pytest.raises(CheckpointError, match=f"is damaged: file {rel}"):
        mgr.select(str(newest))
    assert (newest / rel).exists()  # nothing deleted
    # The verify command reports every damaged file, exit 1; intact checkpoints are OK.
    _flip(newest / "model" / "shard.distcp" if rel == "meta.json" else newest / "meta.json", 3)
    assert ckpt_cli(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "step_00000002: OK" in out and out.count("DAMAGED") == 2 and "meta.json" in out and "shard.distcp" in out
    assert ckpt_cli(["verify", str(tmp_path / "step_00000002")]) == 0
    # Saving step 4 again (after the fall back) moves the damaged one aside instead of refusing.
    save(mgr, 4)
    assert len(list(tmp_path.glob("step_00000004.invalid-*"))) == 1


def test_auto_refuses_to_start_fresh_when_every_checkpoint_is_unusable(tmp_path):
    mgr = CheckpointManager(tmp_path, log=lambda m: None)
    only = save(mgr, 2)
    (only / "meta.json").write_text("{}")  # another size
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        mgr.select("auto")
