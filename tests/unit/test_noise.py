"""Known-harmless third-party warnings are hidden and counted; unknown warnings and errors stay loud; verbose
shows everything (megatron_gift/utils/noise.py)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from megatron_gift.utils.noise import VERBOSE_ENV, hide_known_warnings

KNOWN = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_known_warning_hidden_unknown_shown(monkeypatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with warnings.catch_warnings(record=True) as shown:  # what would reach stderr lands in `shown`
        warnings.simplefilter("always")
        noise = hide_known_warnings()
        try:
            warnings.warn(KNOWN, UserWarning)
            warnings.warn("The pynvml package is deprecated. Please install nvidia-ml-py instead.", FutureWarning)
            warnings.warn("a brand-new warning nobody has vetted", UserWarning)
            warnings.warn(KNOWN, RuntimeWarning)  # known text, other category: not on the list
        finally:
            noise.uninstall()
    assert [(w.category, str(w.message)) for w in shown] == [
        (UserWarning, "a brand-new warning nobody has vetted"), (RuntimeWarning, KNOWN)]
    assert noise.hidden == 2
    assert noise.summary("train") == (f"[train] 2 known-harmless third-party warnings hidden "
                                      f"(--verbose or {VERBOSE_ENV}=1 shows them)")
    assert noise.summary("train") is None  # nothing new since
    noise.hidden += 1
    assert noise.summary("train").startswith("[train] 1 more known-harmless third-party warning hidden (")


_LOG_SCENARIO = """
import json, logging
from megatron_gift.utils.noise import hide_known_warnings
class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())
logger = logging.getLogger("vllm.platforms.cpu")
sink = Records()
logger.addHandler(sink)
logger.propagate = False
noise = hide_known_warnings()
logger.warning("Triton is not installed. triton-cpu is expected on x86 CPUs.")
logger.warning("KV cache is larger than the machine's memory")  # unknown: shown
logger.error("Triton is not installed. triton-cpu is expected on x86 CPUs.")  # an error: never hidden
noise.uninstall()
left = [f.__class__.__name__ for f in logger.filters]
print(json.dumps({"hidden": noise.hidden, "messages": sink.messages, "filters_left": left}))
"""


def test_known_log_records_hidden_errors_and_unknown_kept():
    """In a fresh interpreter: logging is process-global, and vLLM tests earlier in the same pytest process
    reconfigure it (dictConfig), which made this test count nothing in the full suite only."""
    import json
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    proc = subprocess.run([sys.executable, "-c", _LOG_SCENARIO], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["hidden"] == 1
    assert out["messages"] == ["KV cache is larger than the machine's memory",
                               "Triton is not installed. triton-cpu is expected on x86 CPUs."]
    assert "_KnownLogFilter" not in out["filters_left"]


def test_verbose_installs_nothing(monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        before = warnings.showwarning
        noise = hide_known_warnings()
        assert warnings.showwarning is before
        warnings.warn(KNOWN, UserWarning)
    assert noise.hidden == 0 and [str(w.message) for w in shown] == [KNOWN] and noise.summary("train") is None


def _import_megatron_optimizer(verbose: bool):
    code = ("from megatron_gift.utils.noise import hide_known_warnings\n"
            "noise = hide_known_warnings()\n"
            "import megatron.core.optimizer\n"
            "print(noise.hidden)\n")
    env = {**os.environ, VERBOSE_ENV: "1" if verbose else "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1]), proc.stderr


def test_real_third_party_import_warnings():
    """The real Megatron-Core import (TE / Apex fallbacks; the pynvml notice where pynvml is installed)."""
    hidden, quiet_err = _import_megatron_optimizer(verbose=False)
    shown_count, loud_err = _import_megatron_optimizer(verbose=True)
    assert "Transformer Engine and Apex are not installed" in loud_err and shown_count == 0
    assert hidden >= 1 and "Transformer Engine and Apex are not installed" not in quiet_err
    assert "Warning" not in quiet_err, quiet_err
