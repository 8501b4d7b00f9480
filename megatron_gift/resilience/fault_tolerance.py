"""Hang and crash detection through nvidia-resiliency-ext's fault tolerance (its `ft_launcher`).

Owns the trainer's side of the protocol: one `RankMonitorClient` per rank that sends heartbeats (and
optionally opens named sections) to the rank monitor that `ft_launcher` starts next to every worker. A
rank that stops heartbeating for `rank_heartbeat_timeout` seconds (or opens no first heartbeat within
`initial_rank_heartbeat_timeout`) is declared hung; the launcher then kills the workers and restarts them
(`--max-restarts`), and the run resumes from its last complete checkpoint. A rank that dies is restarted
the same way by the launcher itself. Also owns `request_shutdown`: after an honoured stop request the
ranks ask the launcher not to restart them (exiting with the requeue code is a failure to torchelastic).

Inert, with one message, where nvidia-resiliency-ext is not installed or the process was not started by
`ft_launcher` (plain torchrun, a single process, tests): every method is then a no-op, so the trainer
runs the same either way. Timeouts come from the launcher's config (`--ft-param-*` / `--ft-cfg-path`);
`calculate_timeouts()` tightens them from observed intervals (a collective: call it on every rank).
Written for nvidia-resiliency-ext 0.4.1 (the release that installs next to megatron-core 0.16.1).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

# ft_launcher sets this in every worker; the client connects to the rank monitor through it.
MONITOR_SOCKET_ENV = "FT_RANK_MONITOR_IPC_SOCKET"


def _import_ft():
    try:
        from nvidia_resiliency_ext import fault_tolerance as ft
    except ImportError as exc:
        return None, f"nvidia-resiliency-ext is not installed ({exc})"
    return ft, ""


class FaultTolerance:
    """Heartbeats / sections to the rank monitor when under ft_launcher; no-ops otherwise."""

    def __init__(self, client: Any = None, reason: str = "", ft_module: Any = None):
        self.client, self.reason, self._ft = client, reason, ft_module
        self._open: set = set()

    @classmethod
    def start(cls, log: Callable[[str], None] = print, environ: Optional[Mapping[str, str]] = None,
              importer: Callable[[], tuple] = _import_ft) -> "FaultTolerance":
        """Connect to the rank monitor, or return an inert instance and say why (once, via `log`)."""
        environ = os.environ if environ is None else environ
        ft, why = importer()
        if ft is None:
            log(f"[fault tolerance] off: {why}; hung or dead ranks are not detected")
            return cls(reason=why)
        if not environ.get(MONITOR_SOCKET_ENV):
            why = f"not started by ft_launcher (no {MONITOR_SOCKET_ENV})"
            log(f"[fault tolerance] off: {why}; hung or dead ranks are not detected")
            return cls(reason=why, ft_module=ft)
        client = ft.RankMonitorClient()
        client.init_workload_monitoring()
        log(f"[fault tolerance] on: heartbeat timeouts initial={client.hb_timeouts.initial} s, "
            f"subsequent={client.hb_timeouts.subsequent} s")
        return cls(client=client, ft_module=ft)

    @property
    def active(self) -> bool:
        return self.client is not None

    def heartbeat(self) -> None:
        """Tell the monitor this rank is alive (a local IPC round trip; call at least once per step)."""
        if self.client is not None:
            self.client.send_heartbeat()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """A named section; its timeout is `rank_section_timeouts[name]` of the launcher's config."""
        if self.client is None:
            yield
            return
        self.client.start_section(name)
        self._open.add(name)
        try:
            yield
        finally:
            self._open.discard(name)
            self.client.end_section(name)

    def calculate_timeouts(self) -> bool:
        """Replace the configured heartbeat timeouts by observed maxima x safety factor (all ranks agree).

        A collective over the default process group: every rank must call it at the same point. Returns
        False (and changes nothing) when inactive or when too few heartbeats were seen yet.
        """
        if self.client is None:
            return False
        return bool(self.client.calculate_and_set_hb_timeouts(skip_if_not_ready=True))

    def request_shutdown(self, reason: str) -> None:
        """Ask ft_launcher not to restart the workers after they exit (a stop request was honoured)."""
        if self.client is None or self.client.launcher_connector is None:
            return
        req = self._ft.WorkloadControlRequest(self._ft.WorkloadAction.ShutdownWorkload, description=reason)
        self.client.send_workload_control_request(req)

    def state_dict(self) -> Dict[str, Any]:
        """Calculated timeouts, to keep in a checkpoint (the same on every rank)."""
        return dict(self.client.state_dict()) if self.client is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.client is not None and state:
            self.client.load_state_dict(state)

    def close(self) -> None:
        if self.client is not None:
            for name in list(self._open):
                self.client.end_section(name)
            self.client.shutdown_workload_monitoring()
            self.client = None
