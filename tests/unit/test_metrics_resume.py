"""After a resume, TensorBoard shows each step once (the resumed run's values), like metrics.jsonl; a fresh
run into the same directory sets the previous event stream aside instead of mixing with it."""
from __future__ import annotations

import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_gift.trainer.report import MetricsLog, read_metrics


def _scalars(run_dir, tag="loss"):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(6):  # killed after step 5; the checkpoint is step 3
        log.log(step, {"loss": float(step)})
    log.close()
    time.sleep(1.1)  # event file names carry the time in seconds
    log = MetricsLog(tmp_path, resume_step=3)
    for step in (4, 5):
        log.log(step, {"loss": 10.0 + step})
    log.close()
    assert _scalars(tmp_path) == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]


def test_fresh_run_sets_the_previous_events_aside(tmp_path):
    log = MetricsLog(tmp_path)
    log.log(0, {"loss": 1.0})
    log.close()
    log = MetricsLog(tmp_path)
    log.log(0, {"loss": 2.0})
    log.close()
    assert _scalars(tmp_path) == [(0, 2.0)]
    assert len(list(tmp_path.glob("tensorboard.prev-*"))) == 1
