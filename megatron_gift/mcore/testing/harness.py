"""Multi-process gloo harness: run a function on N CPU ranks under Megatron parallel state.

Owns: spawning the ranks (torch.multiprocessing "spawn", a free TCP port from the OS), per-rank set-up
(one thread per process, CPU compatibility layer, torch.distributed gloo, Megatron parallel state,
model-parallel RNG seed), collecting each rank's return value, and turning a failure or a hang on ANY
rank into one exception in the parent that carries that rank's traceback.
Does not own: what the ranks compute (the caller's `fn`), parallel-state details (mcore/parallel.py).

`fn` must be picklable (a module-level function) and is called as `fn(rank, world_size, **kwargs)`.
Return values travel back pickled (tensors by value, not shared memory), so keep them small.
world_size == 1 runs the same per-rank code in the calling process (no spawn) unless spawn=True.
On a host with CUDA the ranks are still CPU processes: they are started with CUDA_VISIBLE_DEVICES=""
(so the compatibility layer, which never activates where CUDA is visible, can run in them), and
world_size == 1 is spawned too, since the calling process sees the GPU.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_gift.mcore.cpu_compat import enable_cpu_compat
from megatron_gift.mcore.parallel import check_parallel_sizes, destroy_parallel, initialize_parallel

# Environment for every rank: one OpenMP / MKL thread (N ranks share 2 cores), gloo on loopback,
# no GPU (this is the CPU harness, also on GPU hosts).
RANK_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            "MASTER_ADDR": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
_GRACE_S = 3.0  # after a first failure, how long to wait for the other ranks' own reports
_READY, _DONE, _FAILED = "ready", "done", "failed"  # messages a rank sends on the results queue
_DIED = "process died"


class DistributedRunError(RuntimeError):
    """A rank raised, died or hung; the message holds the failing rank and its traceback."""

    def __init__(self, message: str, rank: Optional[int] = None) -> None:
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    """A TCP port the OS reports free on 127.0.0.1 (closed again before the ranks bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(fn: Callable[..., Any], world_size: int, tp: int = 1, pp: int = 1, cp: int = 1,
                    vpp: Optional[int] = None, timeout: float = 300.0, start_timeout: float = 300.0,
                    seed: int = 1234, spawn: Optional[bool] = None, ep: int = 1, etp: int = 1,
                    **kwargs: Any) -> List[Any]:
    """Run `fn(rank, world_size, **kwargs)` on `world_size` gloo ranks; return the values by rank.

    Each rank enables the CPU compatibility layer, joins a gloo process group, initialises Megatron
    parallel state with the given tp/pp/cp/vpp (dp = world_size / (tp*pp*cp)) and seeds the
    model-parallel RNG with `seed`. Raises DistributedRunError with the failing rank's traceback if any
    rank fails or exits, or naming the ranks not started after `start_timeout` seconds (imports and
    rendezvous are slow on a busy 2-core machine) or still running `timeout` seconds after all started.
    """
    check_parallel_sizes(world_size, tp, pp, cp, vpp, ep, etp)
    spec = dict(world_size=world_size, tp=tp, pp=pp, cp=cp, vpp=vpp, ep=ep, etp=etp, seed=seed, timeout=timeout,
                start_timeout=start_timeout, port=free_port())
    if spawn is None:
        spawn = world_size > 1 or torch.cuda.is_available()
    if not spawn:
        if world_size != 1:
            raise ValueError(f"spawn=False needs world_size=1 (got {world_size})")
        if torch.cuda.is_available():
            raise RuntimeError("run_distributed(spawn=False): this process sees CUDA, and the harness runs "
                               "CPU/gloo ranks only; leave spawn unset to run the rank in a CPU-only process")
        return [_run_in_process(fn, spec, kwargs)]
    return _run_spawned(fn, spec, kwargs)


# ----------------------------------------------------------------------------- per-rank body
@contextlib.contextmanager
def _rank_context(rank: int, spec: Dict[str, Any]) -> Iterator[None]:
    """Compat layer + process group + Megatron parallel state for one rank, torn down on exit."""
    if dist.is_initialized():
        raise RuntimeError("run_distributed: torch.distributed is already initialised in this process")
    with enable_cpu_compat(strict=True):
        dist.init_process_group(
            backend="gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
            world_size=spec["world_size"],
            # gloo's own timeout covers the rendezvous too, whose ranks start seconds apart.
            timeout=timedelta(seconds=max(spec["timeout"], spec["start_timeout"])))
        try:
            initialize_parallel(spec["tp"], spec["pp"], spec["cp"], spec["vpp"], seed=spec["seed"],
                                ep=spec["ep"], etp=spec["etp"])
            try:
                yield
            finally:
                destroy_parallel()
        finally:
            dist.destroy_process_group()


def _run_in_process(fn: Callable[..., Any], spec: Dict[str, Any], kwargs: Dict[str, Any]) -> Any:
    # Seeding the model-parallel RNG reseeds the CPU generator (cpu_compat): give the caller's back.
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        with _rank_context(0, spec):
            return fn(0, 1, **kwargs)
    except Exception as exc:
        raise DistributedRunError(f"rank 0 of 1 failed:\n{traceback.format_exc()}", rank=0) from exc
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng_state)


def _worker(rank: int, fn: Callable[..., Any], spec: Dict[str, Any], kwargs: Dict[str, Any],
            results: "mp.Queue") -> None:
    torch.set_num_threads(1)
    try:
        with _rank_context(rank, spec):
            results.put((rank, _READY, None))
            value = fn(rank, spec["world_size"], **kwargs)
        # Plain pickle: tensors by value (torch's queue pickler would use shared memory).
        results.put((rank, _DONE, pickle.dumps(value)))
    except BaseException:  # report everything, including KeyboardInterrupt / SystemExit, to the parent
        results.put((rank, _FAILED, traceback.format_exc()))


# ----------------------------------------------------------------------------- parent side
@contextlib.contextmanager
def _rank_environment() -> Iterator[None]:
    """Spawned children copy os.environ at start: set the per-rank variables around the starts."""
    saved = {k: os.environ.get(k) for k in RANK_ENV}
    os.environ.update({k: os.environ.get(k, v) if k == "GLOO_SOCKET_IFNAME" else v
                       for k, v in RANK_ENV.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_spawned(fn: Callable[..., Any], spec: Dict[str, Any], kwargs: Dict[str, Any]) -> List[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    n = spec["world_size"]
    procs = []
    with _rank_environment():
        for rank in range(n):
            p = ctx.Process(target=_worker, args=(rank, fn, spec, kwargs, results), daemon=True,
                            name=f"gloo-rank-{rank}")
            p.start()
            procs.append(p)
    try:
        return _collect(procs, results, spec["timeout"], spec["start_timeout"])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        results.close()


def _collect(procs: List[Any], results: "mp.Queue", timeout: float, start_timeout: float) -> List[Any]:
    """Wait for every rank: start-up within start_timeout, then fn within timeout of the last start."""
    n = len(procs)
    ready: set = set()
    values: Dict[int, Any] = {}
    failures: Dict[int, str] = {}
    dead_since: Dict[int, float] = {}
    deadline = time.monotonic() + start_timeout
    while len(values) + len(failures) < n:
        now = time.monotonic()
        if failures:
            deadline = min(deadline, now + _GRACE_S)
        if now >= deadline:
            break
        try:
            rank, kind, payload = results.get(timeout=min(0.5, deadline - now))
        except queue.Empty:
            _note_dead(procs, values, failures, dead_since)
            continue
        if kind == _READY:
            ready.add(rank)
            if len(ready) == n and not failures:
                deadline = time.monotonic() + timeout
        elif kind == _DONE:
            values[rank] = pickle.loads(payload)
        else:
            failures[rank] = payload
    if failures:
        raise _failure_error(failures, n)
    if len(ready) < n:
        missing = sorted(set(range(n)) - ready)
        raise DistributedRunError(
            f"ranks {missing} of {n} did not finish start-up (imports, gloo rendezvous, Megatron parallel "
            f"state) within start_timeout={start_timeout:g} s", rank=missing[0])
    missing = sorted(set(range(n)) - set(values))
    if missing:
        raise DistributedRunError(
            f"ranks {missing} of {n} did not return within timeout={timeout:g} s after start-up "
            f"(hung or deadlocked); returned: {sorted(values)}", rank=missing[0])
    return [values[r] for r in range(n)]


def _note_dead(procs: List[Any], values: Dict[int, Any], failures: Dict[int, str],
               dead_since: Dict[int, float]) -> None:
    """A rank that exited without reporting counts as failed: at once with a non-zero exit code
    (segfault, os._exit, OOM kill: _worker itself always exits 0), after _GRACE_S with code 0 (its
    last message may still be in the pipe)."""
    now = time.monotonic()
    for rank, p in enumerate(procs):
        if rank in values or rank in failures or p.is_alive() or p.exitcode is None:
            continue
        if p.exitcode != 0 or now - dead_since.setdefault(rank, now) > _GRACE_S:
            failures[rank] = f"{_DIED}: exited with code {p.exitcode} without reporting a result"


def _failure_error(failures: Dict[int, str], n: int) -> DistributedRunError:
    """One error for the whole run: the likely root cause in full, the other ranks in one line each.
    A rank that died without reporting comes first (the others then fail with 'connection reset'
    echoes); otherwise the first rank to report."""
    order = sorted(failures, key=lambda r: not failures[r].startswith(_DIED))  # stable: keeps arrival order
    first, others = order[0], order[1:]
    lines = [f"rank {first} of {n} failed:", failures[first].rstrip()]
    if others:
        lines.append("other failing ranks (often consequences of the first):")
        lines += [f"  rank {r}: {failures[r].strip().splitlines()[-1]}" for r in others]
    return DistributedRunError("\n".join(lines), rank=first)
