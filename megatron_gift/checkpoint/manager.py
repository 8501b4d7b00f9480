"""Training-checkpoint directories: atomic commit, completion marker, retention, choosing what to resume.

Owns the on-disk layout of `save_dir` (what the tensors inside are is mcore/dist_ckpt.py's business):

    save_dir/
      step_00000040/              a complete checkpoint (renamed from tmp.step_00000040 after its marker)
        model/                    Megatron dist checkpoint: model chunks, optimizer, LR schedule, sampler, step
        rng/rank_00000.pt ...     every rank's random generators
        gift_checkpoint.json      metadata: step, model fingerprint, config items that must not change, layout
        metrics.jsonl             the run's metrics history up to this step
        complete.json             THE completion marker: step + every file's size and checksum (written last, by rank 0)
      tmp.step_00000042/          a save in progress (or one killed mid-way): never resumed from

Atomicity: all ranks write into `tmp.step_N`; after a barrier rank 0 lists every file with its size into
`complete.json` (fsynced), renames the directory to `step_N` (fsynced) and only then deletes checkpoints
beyond the newest `keep_last` complete ones (renamed to `deleting.*` first, so a crash mid-delete never
leaves a half-deleted checkpoint that looks complete). A checkpoint is valid when its marker parses, every
listed file exists with its listed size and its content has the checksum recorded at save time (every rank
hashes a share of the files after the write, and again when choosing what to resume from: integrity.py): a
missing marker, a truncated / missing file or changed bytes make `select("auto")` fall back to the previous
one, naming the file. Resume never deletes anything; `python -m megatron_gift.checkpoint verify DIR` reports
every damaged file.
Metadata: `check_compatible` compares the saved fingerprint with the run's and names the first key that
differs with both values (another model, loss or optimizer kind). The parallel layout may differ.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.distributed as dist

from megatron_gift.checkpoint import integrity
from megatron_gift.hf.files import CheckpointError
from megatron_gift.resilience.leftovers import clean_stale, write_owner

MARKER = "complete.json"
METADATA = "gift_checkpoint.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Candidate:
    step: int
    path: Path


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _gather_lists(items: List[Any]) -> List[Any]:
    """Every rank's list concatenated (in rank order), on every rank."""
    if not _dist_on() or dist.get_world_size() == 1:
        return list(items)
    boxes: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, items)
    return [x for box in boxes for x in box]


def _broadcast_from_rank0(obj: Any) -> Any:
    if not _dist_on() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durable(path: Path, data: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def list_files(root: Path) -> Dict[str, int]:
    """Every regular file under `root` (relative posix path -> size in bytes), the marker excluded."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MARKER:
            out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


def verify(path: Path, content: bool = False) -> Optional[str]:
    """None if `path` is a complete checkpoint, else the reason it is not (marker, a missing / truncated file;
    with `content`, also a file whose bytes no longer match the checksum recorded at save time)."""
    reason = _verify_sizes(path)
    if reason is None and content:
        bad = damaged_files(path)
        if bad:
            return _damage_reason(bad)
    return reason


def _damage_reason(bad: List[Tuple[str, str]]) -> str:
    return "; ".join(f"file {rel}: {why}" for rel, why in bad)


def damaged_files(path: Path, rank: int = 0, world: int = 1) -> List[Tuple[str, str]]:
    """(file, reason) for the files of this rank's share whose content differs from the checksum recorded in
    the marker (a marker without checksums, written before they existed: nothing to compare)."""
    info = json.loads((path / MARKER).read_text())
    recorded = info.get("checksums") or {}
    sizes = {rel: size for rel, size in info["files"].items() if rel in recorded}
    return integrity.damaged(path, recorded, integrity.share(sizes, rank, world))


def _verify_sizes(path: Path) -> Optional[str]:
    marker = path / MARKER
    if not marker.is_file():
        return f"no completion marker {MARKER} (save interrupted?)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable marker {marker}: {exc}"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"file {rel} listed in the marker is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"file {rel} has {actual} bytes, the marker recorded {size} (truncated or rewritten)"
    return None


def read_metadata(path: Path) -> Dict[str, Any]:
    meta = path / METADATA
    if not meta.is_file():
        raise CheckpointError(f"{meta}: missing (not a megatron-gift training checkpoint?)")
    try:
        data = json.loads(meta.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta}: not valid JSON: {exc}") from exc
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta}: format_version {data.get('format_version')!r} != supported {FORMAT_VERSION}")
    return data


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: Path) -> None:
    """Raise naming the first fingerprint key whose value differs (or is missing) between checkpoint and run."""
    for key, value in _flatten(current).items():
        theirs = _flatten(saved).get(key, "<absent>")
        if theirs != value:
            raise CheckpointError(f"checkpoint {where} is incompatible with this run: {key} is {theirs!r} in the "
                                  f"checkpoint but {value!r} in this run's config (checkpoint of another model "
                                  f"or run?). Use another save_dir or trainer.resume=none to start fresh.")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


class CheckpointManager:
    """Directory side of saving and resuming; every rank builds one, rank 0 does the file-system changes.

    `begin(step)` (all ranks) -> tmp dir; ranks write into it; `commit(tmp, step)` (all ranks) -> step dir.
    """

    def __init__(self, save_dir: str | Path, keep_last: int = 2, log: Callable[[str], None] = print):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.save_dir = Path(save_dir)
        self.keep_last = keep_last
        self.log = log
        self.last_checksum_seconds = 0.0

    # ----- saving -----------------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """Rank 0 makes an empty tmp.step_N (a stale one from a killed save of this step is removed: it never
        had its marker renamed into place); all ranks return after it exists."""
        tmp = self.save_dir / f"tmp.{step_dir_name(step)}"
        if _rank() == 0:
            self._move_aside_invalid(self.save_dir / step_dir_name(step))
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        return tmp

    def _move_aside_invalid(self, final: Path) -> None:
        """An incomplete / corrupt step_N where this save must go is kept under another name, never deleted."""
        if not final.exists():
            return
        reason = verify(final, content=True)
        if reason is None:
            raise CheckpointError(f"{final} already exists and is complete: refusing to overwrite a saved checkpoint")
        aside = final.with_name(f"{final.name}.invalid-{int(time.time())}")
        os.replace(final, aside)
        self.log(f"[checkpoint] moved invalid {final} ({reason}) to {aside}")

    def commit(self, tmp: Path, step: int) -> Path:
        """All ranks, after they finished writing: rank 0 writes the marker, renames, applies retention."""
        _barrier()
        final = self.save_dir / step_dir_name(step)
        files = _broadcast_from_rank0(list_files(tmp) if _rank() == 0 else None)
        start = time.perf_counter()
        sums = dict(_gather_lists(list(integrity.checksums(tmp, integrity.share(files, _rank(), _world())).items())))
        self.last_checksum_seconds = time.perf_counter() - start
        if _rank() == 0:
            _write_json_durable(tmp / MARKER, {"step": step, "files": files, "checksums": sums,
                                               "checksum_algorithm": integrity.ALGORITHM, "saved_at": time.time()})
            self.log(f"[checkpoint] step {step}: checksums of {len(files)} files ({sum(files.values()) / 1e6:.1f} MB) "
                     f"in {self.last_checksum_seconds:.2f}s")
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.save_dir)
            self.apply_retention()
        _barrier()
        return final

    def apply_retention(self) -> List[Path]:
        """Delete complete checkpoints older than the newest `keep_last` complete ones (rank 0); returns them."""
        complete = [c for c in self.candidates() if verify(c.path) is None]
        doomed = complete[:-self.keep_last] if len(complete) > self.keep_last else []
        for c in doomed:
            trash = c.path.with_name(f"deleting.{c.path.name}.pid-{os.getpid()}")
            os.replace(c.path, trash)
            write_owner(trash)
            shutil.rmtree(trash)
        return [c.path for c in doomed]

    def clean_leftovers(self) -> List[Path]:
        """Remove half-deleted checkpoints (`deleting.step_N*`) that a killed retention left, when the process
        that was deleting them no longer runs (resilience/leftovers.py); says so for each. `deleting.step_N`
        without a pid (written before pids were recorded) is half-deleted garbage whoever left it."""
        return clean_stale(self.save_dir, "deleting.step_*", log=self.log, ownerless_is_stale=True)

    # ----- resuming ---------------------------------------------------------------------------------
    def candidates(self) -> List[Candidate]:
        """step_N directories in save_dir, oldest first (complete or not)."""
        if not self.save_dir.is_dir():
            return []
        found = []
        for p in self.save_dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                found.append(Candidate(int(m.group(1)), p))
        return sorted(found, key=lambda c: c.step)

    def _complete_by_size(self) -> Tuple[List[str], List[str]]:
        """Checkpoints whose marker and file sizes are right (newest first) and why the others were skipped."""
        ok, skipped = [], []
        for c in reversed(self.candidates()):
            reason = verify(c.path)
            if reason is None:
                ok.append(str(c.path))
            else:
                skipped.append(f"{c.path}: {reason}")
        return ok, skipped

    def select(self, resume: str) -> Optional[Path]:
        """What to resume from: 'none' -> None; 'auto' -> newest complete in save_dir (or None); else a path,
        which must itself be complete. Rank 0 decides, every rank gets the same answer."""
        decision: Tuple[List[str], Optional[str], List[str]] = ([], None, [])
        if _rank() == 0:
            self.clean_leftovers()
            decision = self._decide(resume)
        paths, error, skipped = _broadcast_from_rank0(decision)
        chosen = None
        for path in paths:  # newest first; each checked against its checksums by all ranks together
            bad = sorted(_gather_lists(damaged_files(Path(path), _rank(), _world())))
            if not bad:
                chosen = path
                break
            if resume != "auto":
                error = f"trainer.resume={resume!r} is damaged: {_damage_reason(bad)}"
                break
            skipped.append(f"{path}: {_damage_reason(bad)}")
        for line in skipped:
            self.log(f"[checkpoint] skipping {line}")
        if not error and resume == "auto" and chosen is None and skipped:
            # Starting from scratch next to checkpoints that are all unusable would silently throw the run away.
            error = (f"trainer.resume='auto': no intact checkpoint in {self.save_dir} (every one was skipped, see "
                     "above): repair or move them, resume from one explicitly, or use another trainer.save_dir "
                     "to start fresh")
        if error:
            raise CheckpointError(error)
        return Path(chosen) if chosen else None

    def _decide(self, resume: str):
        """(candidate paths newest first, error, skipped reasons); checksums are checked by `select`."""
        if resume == "auto":
            ok, skipped = self._complete_by_size()
            return ok, None, skipped
        if resume == "none":
            path, start = None, 0
        else:
            path = Path(resume)
            if not path.is_dir():
                return [], f"trainer.resume={resume!r}: no such checkpoint directory", []
            reason = verify(path)
            if reason:
                return [], f"trainer.resume={resume!r} is not a complete checkpoint: {reason}", []
            start = int(json.loads((path / MARKER).read_text())["step"])
        newer = [str(c.path) for c in self.candidates() if c.step > start and verify(c.path) is None]
        if newer:
            # Saving on from an older state would interleave two runs' checkpoints (and retention would
            # delete the wrong ones): refuse instead of guessing.
            return [], (f"trainer.resume={resume!r} starts at step {start} but save_dir {self.save_dir} holds "
                        f"newer complete checkpoints {newer}: use another trainer.save_dir"), []
        return ([str(path)] if path else []), None, []
