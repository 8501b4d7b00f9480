"""Leftovers of killed processes: temporary directories that only a dead writer could have left.

Owns: marking a temporary directory with its owner (host and pid, in a small file inside it), deciding
whether a temporary directory is stale (its owner process is dead on this host), and removing stale ones
with a message. Writers name their temporaries `<prefix><pid>...` (`.OUT.tmp-PID` of the converters and the
trainer's TP/PP conversion, `deleting.step_N.pid-PID` of checkpoint retention); a directory is removed only
when its owner is known to be dead: the owner file names this host (or there is none: written before owner
files existed, or by a process killed before it wrote it) and no process with that pid exists here. A
directory owned by another host (a shared file system) or by a live process is never touched.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, List, Optional

OWNER_FILE = ".mg_owner"
_PID_RE = re.compile(r"(?:tmp-|pid-)(\d+)")


def write_owner(path: Path) -> None:
    """Record this process as the owner of the temporary directory `path`."""
    (Path(path) / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")


def drop_owner(path: Path) -> None:
    """Remove the owner record before the directory becomes a final output."""
    try:
        (Path(path) / OWNER_FILE).unlink()
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_of(path: Path) -> Optional[tuple]:
    """(host, pid) of a temporary directory, from its owner file or else from the pid in its name."""
    try:
        host, pid = (Path(path) / OWNER_FILE).read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        m = _PID_RE.search(Path(path).name)
        return (socket.gethostname(), int(m.group(1))) if m else None


def is_stale(path: Path, ownerless_is_stale: bool = False) -> bool:
    """True when the directory's owner process is dead on this host (never for another host's or a live one).
    A directory naming no owner at all is stale only with `ownerless_is_stale`."""
    owner = owner_of(path)
    if owner is None:
        return ownerless_is_stale
    host, pid = owner
    return host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid)


def clean_stale(parent: Path, pattern: str, log: Callable[[str], None] = print,
                ownerless_is_stale: bool = False) -> List[Path]:
    """Remove the directories in `parent` matching the glob `pattern` whose owner process is dead."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for path in sorted(parent.glob(pattern)):
        if path.is_dir() and is_stale(path, ownerless_is_stale):
            host, pid = owner_of(path) or ("?", "?")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log(f"[cleanup] removed {path}: left by process {pid} on {host}, which no longer runs "
                "(an interrupted write)")
    return removed
