"""Where the trainer looks at stop requests: a signal that arrives during a checkpoint save is honoured right after
that save (before: one more full step ran and saved again)."""
from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import torch

from megatron_gift.resilience.stop import StopRequest
from megatron_gift.trainer.trainer import Trainer


def test_a_signal_during_a_save_stops_right_after_it():
    trainer = object.__new__(Trainer)  # only the end-of-step logic: no model, engine or process group
    trainer.stop = StopRequest().install()
    trainer.rt = SimpleNamespace(device=torch.device("cpu"))
    trainer.async_saver = None
    trainer.step = 2
    saves = []

    def save_checkpoint():
        saves.append(trainer.step)
        os.kill(os.getpid(), signal.SIGTERM)  # the job is preempted while the checkpoint is written

    trainer.save_checkpoint = save_checkpoint
    trainer._save_due = lambda: True
    try:
        trainer._end_of_step({"step_time_s": 1.0})
    finally:
        trainer.stop.uninstall()
    assert saves == [2] and trainer.stop_reason == "signal SIGTERM"
