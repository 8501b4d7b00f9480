"""benchmarks/vs_trl.py's step order: every variant gets its warm-up and measured steps in either schedule."""
from collections import Counter

import pytest

from benchmarks.vs_trl import run_order, steps_per_variant


@pytest.mark.parametrize("schedule", ["interleaved", "blocks"])
def test_every_variant_gets_its_steps(schedule):
    order = list(run_order(["ours", "trl", "x"], 1, 5, schedule))
    measured = Counter(k for k, m in order if m)
    assert measured == {"ours": 5, "trl": 5, "x": 5}


def test_interleaved_rotates_and_blocks_rewarm_each_block():
    inter = list(run_order(["a", "b"], 1, 2, "interleaved"))
    assert inter == [("a", False), ("b", False), ("b", True), ("a", True), ("a", True), ("b", True)]
    blocks = list(run_order(["a", "b"], 1, 3, "blocks"))  # a: 2 then b: 2, reversed pass b: 1 then a: 1
    assert blocks == [("a", False), ("a", True), ("a", True), ("b", False), ("b", True), ("b", True),
                      ("b", False), ("b", True), ("a", False), ("a", True)]


def test_workers_are_sized_for_every_step_they_will_run():  # TRL's max_steps: a short one drops the variant
    assert steps_per_variant({"warmup": 1, "steps": 8, "schedule": "blocks"}) == 10
    assert steps_per_variant({"warmup": 1, "steps": 8, "schedule": "interleaved"}) == 9
