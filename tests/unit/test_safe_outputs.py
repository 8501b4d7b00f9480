"""Outputs never destroy inputs, and leftovers of killed writers are cleaned (only those of dead processes).

- Both converters refuse an --out that is, contains or sits inside the source model (with --overwrite too:
  it once deleted the source's model.safetensors); the source files are unchanged afterwards.
- `.OUT.tmp-PID` of a dead process is removed at the next conversion with a message; a live one's is kept.
- Half-deleted checkpoints `deleting.step_N*` of a dead process are removed when a run selects its checkpoint.
"""
from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gift.checkpoint.manager import CheckpointManager
from megatron_gift.cli import convert_hf_to_mcore, convert_mcore_to_hf
from megatron_gift.hf.files import atomic_output_dir
from tests.tiny_hf import save_tiny, tiny_configs


def _digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def hf_dir(tmp_path):
    return save_tiny("llama2_tied", tiny_configs()["llama2_tied"], tmp_path / "models" / "hf")


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_hf_to_mcore_refuses_an_output_overlapping_the_source(hf_dir, where):
    before = _digest(hf_dir.parent)
    out = {"same": hf_dir, "inside": hf_dir / "mcore", "parent": hf_dir.parent}[where]
    word = {"same": "is", "inside": "sits inside", "parent": "contains"}[where]
    with pytest.raises(ValueError, match=f"{word} the --hf-dir"):
        convert_hf_to_mcore.convert(hf_dir, out, "float32", overwrite=True, quiet=True)
    assert _digest(hf_dir.parent) == before
    # The command line says the same in one line, exit 1.
    assert convert_hf_to_mcore.main(["--hf-dir", str(hf_dir), "--out", str(out), "--overwrite", "--quiet"]) == 1
    assert _digest(hf_dir.parent) == before


def test_mcore_to_hf_refuses_an_output_overlapping_the_source(hf_dir, tmp_path):
    mcore = tmp_path / "mcore"
    convert_hf_to_mcore.convert(hf_dir, mcore, "float32", quiet=True)
    before = _digest(mcore)
    for out, word in [(mcore, "is"), (mcore / "hf", "sits inside"), (tmp_path, "contains")]:
        with pytest.raises(ValueError, match=f"{word} the --mcore-dir"):
            convert_mcore_to_hf.export(mcore, out, overwrite=True, quiet=True)
    assert _digest(mcore) == before


def test_converter_argument_errors(hf_dir, tmp_path, capsys):
    for bad in ("0", "-7", "x"):
        with pytest.raises(SystemExit) as exc:
            convert_hf_to_mcore.main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "o"), "--vocab-multiple", bad])
        assert exc.value.code == 2
        assert "--vocab-multiple" in capsys.readouterr().err
    code = convert_hf_to_mcore.main(["--hf-dir", str(hf_dir / "config.json"), "--out", str(tmp_path / "o")])
    assert code == 1 and "is a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stale_temp_dirs_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead, legacy = tmp_path / f".out.tmp-{_dead_pid()}", tmp_path / f".out.tmp-{_dead_pid()}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.tmp-{sleeper.pid}"
        other = tmp_path / ".other.tmp-1"
        for d in (dead, legacy, live, other):
            d.mkdir()
            (d / "weights.bin").write_bytes(b"x" * 10)
        (dead / ".mg_owner").write_text(f"{socket.gethostname()} {dead.name.rsplit('-', 1)[1]}\n")
        messages = []
        with atomic_output_dir(out, log=messages.append) as tmp:
            (tmp / "f").write_text("new")
        assert (out / "f").read_text() == "new" and not (out / ".mg_owner").exists()
        assert not dead.exists() and not legacy.exists()
        assert live.exists() and other.exists()  # a live writer's, and another output's
        assert len(messages) == 2 and all("no longer runs" in m for m in messages)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_another_hosts_temp_dir_is_kept(tmp_path):
    d = tmp_path / f".out.tmp-{_dead_pid()}"
    d.mkdir()
    (d / ".mg_owner").write_text(f"some-other-node {d.name.rsplit('-', 1)[1]}\n")
    with atomic_output_dir(tmp_path / "out", log=lambda m: None):
        pass
    assert d.exists()


def test_half_deleted_checkpoints_of_dead_processes_are_removed(tmp_path):
    save = tmp_path / "ckpts"
    save.mkdir()
    legacy = save / "deleting.step_00000002"  # the name before owner pids
    dead = save / f"deleting.step_00000004.pid-{_dead_pid()}"
    mine = save / "deleting.step_00000006.pid-1"  # pid 1 (init) is alive
    for d in (legacy, dead, mine):
        (d / "model").mkdir(parents=True)
    messages = []
    assert CheckpointManager(save, log=messages.append).select("auto") is None
    assert not legacy.exists() and not dead.exists() and mine.exists()
    assert sum("removed" in m for m in messages) == 2
