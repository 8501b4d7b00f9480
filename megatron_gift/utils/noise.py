"""Known-harmless third-party warnings, hidden and counted so a run's first lines are ours (L0).

Owns the list of warnings that say nothing actionable on the machines we run on (Transformer Engine / Apex
fallbacks, the pynvml deprecation, vLLM's CPU and in-process notices, Megatron's rerun-machine notices), a
`warnings.showwarning` hook and logging filters that hide exactly those, the count, and the one summary line.
Anything not on the list is shown as before; log records at ERROR or above are never hidden; with
`--verbose` or MEGATRON_GIFT_VERBOSE=1 nothing is installed and everything is shown.

Logging filters sit on the emitting loggers themselves (created here before vLLM / Megatron fetch them):
vLLM re-applies its logging dictConfig while an engine starts, which replaces handlers but keeps logger
filters. If a library moves a message to another module the warning simply shows again.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Pattern, Tuple

VERBOSE_ENV = "MEGATRON_GIFT_VERBOSE"

# (warning category name, message regex): python `warnings`.
KNOWN_WARNINGS: List[Tuple[str, str]] = [
    ("FutureWarning", r"The pynvml package is deprecated"),
    ("FutureWarning", r"`torch\.distributed\.reduce_op` is deprecated"),  # vLLM's triton dispatcher scans modules
    ("UserWarning", r"Transformer Engine and Apex are not installed\. Falling back"),
    ("UserWarning", r"Apex is not installed\. Falling back"),
    ("UserWarning", r"full scope is deprecated\. Use empty cuda_graph_scope"),
    ("DeprecationWarning", r"megatron\.core\.transformer\.custom_layers\.transformer_engine' \s*module is deprecated"),
    ("DeprecationWarning", r"MLP requires ffn_hidden_size"),
]

# logger name -> message regexes (records below ERROR only).
KNOWN_LOGS: Dict[str, List[str]] = {
    "vllm.engine.arg_utils": [r"The global random seed is set to .* VLLM_ENABLE_V1_MULTIPROCESSING is set to False"],
    "vllm.config.vllm": [r"Enforce eager set, disabling torch\.compile", r"Inductor compilation was disabled",
                         r"Model Runner V2 requires Triton"],
    "vllm.platforms.cpu": [r"Triton is not installed\. triton-cpu is expected", r"Reset SSM cache type"],
    "vllm.v1.worker.cpu_worker": [r"is not found in LD_PRELOAD", r"doesn't allow to use `torch\.set_num_threads`"],
    "vllm.triton_utils.importing": [r"doesn't include CPU backend\. Disabling Triton"],
    "vllm.renderers.base": [r"Using None for EOS token id because tokenizer is not initialized"],
    "megatron.core.rerun_state_machine": [r"RerunStateMachine initialized in mode", r"Implicit initialization of Rerun"],
}


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class NoiseFilter:
    """The installed hooks and how many warnings they hid (`hidden`)."""

    hidden: int = 0
    reported: int = 0
    _warnings: List[Tuple[str, Pattern[str]]] = field(default_factory=list)
    _previous_showwarning: Optional[Callable] = None
    _log_filters: List[Tuple[logging.Logger, logging.Filter]] = field(default_factory=list)

    def is_known_warning(self, message, category) -> bool:
        text = str(message)
        return any(category.__name__ == cat and rx.search(text) for cat, rx in self._warnings)

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        if self.is_known_warning(message, category):
            self.hidden += 1
            return
        self._previous_showwarning(message, category, filename, lineno, file, line)

    def summary(self, tag: str) -> Optional[str]:
        """One line about the warnings hidden since the last summary (None when there were none)."""
        new, more, self.reported = self.hidden - self.reported, self.reported > 0, self.hidden
        if new <= 0:
            return None
        return (f"[{tag}] {new}{' more' if more else ''} known-harmless third-party warning{'s' if new != 1 else ''} "
                f"hidden (--verbose or {VERBOSE_ENV}=1 shows them)")

    def uninstall(self) -> None:
        if self._previous_showwarning is not None and warnings.showwarning == self._showwarning:
            warnings.showwarning = self._previous_showwarning
        for logger, flt in self._log_filters:
            logger.removeFilter(flt)
        self._log_filters.clear()


class _KnownLogFilter(logging.Filter):
    def __init__(self, patterns: List[Pattern[str]], owner: NoiseFilter):
        super().__init__()
        self.patterns, self.owner = patterns, owner

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not any(rx.search(record.getMessage()) for rx in self.patterns):
            return True
        self.owner.hidden += 1
        return False


def hide_known_warnings(verbose: bool = False) -> NoiseFilter:
    """Install the hooks (nothing when verbose); returns the filter holding the count."""
    noise = NoiseFilter()
    if verbose or verbose_requested():
        return noise
    noise._warnings = [(cat, re.compile(rx)) for cat, rx in KNOWN_WARNINGS]
    noise._previous_showwarning = warnings.showwarning
    warnings.showwarning = noise._showwarning
    for name, patterns in KNOWN_LOGS.items():
        logger = logging.getLogger(name)
        flt = _KnownLogFilter([re.compile(p) for p in patterns], noise)
        logger.addFilter(flt)
        noise._log_filters.append((logger, flt))
    return noise
