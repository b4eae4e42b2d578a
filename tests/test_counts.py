"""The qemu plugin's report -> bench's instruction figures (no emulator needed).

The plugin itself runs in tests/test_devices.py (and its self-test in tools/build_runtime.sh).
"""

from __future__ import annotations

import pytest
from vitq_edge.device.base import instruction_summary
from vitq_edge.errors import VitqError


def schedule_span(critical: int, serial: int, tasks_work: int) -> dict:
    return {"critical_path": critical, "serial": serial, "task_work": tasks_work, "tasks": 40, "regions": 9,
            "largest_task": 1000, "pool": 777, "untracked": 0, "busiest_thread": critical + 5, "threads_seen": 4}


def test_one_thread_takes_the_median_timed_span():
    report = {"plugin": "insn_count", "format": 2, "exact": True, "spans": [999, 10, 12, 11], "schedule": None}
    s = instruction_summary(report, warmup=1, threads=1)
    assert (s["per_inference"], s["min"], s["max"], s["inferences"]) == (11, 10, 12, 3)
    assert s["exact"] and s["method"] == "one thread" and "work" not in s


def test_several_threads_take_the_critical_path_not_the_spans():
    spans = [schedule_span(9000, 100, 20000), schedule_span(5000, 100, 16000), schedule_span(5100, 110, 16010),
             schedule_span(5050, 100, 16000)]
    report = {"plugin": "insn_count", "format": 2, "exact": True, "spans": [30000, 19000, 19100, 19050],
              "schedule": {"threads": 4, "pool_code": [1, 2], "spans": spans}}
    s = instruction_summary(report, warmup=1, threads=4)
    assert s["method"] == "critical path" and s["exact"] and s["threads"] == 4
    assert (s["per_inference"], s["min"], s["max"]) == (5050, 5000, 5100)  # the warmup span dropped
    assert s["work"] == 16100 and s["serial"] == 100 and s["pool"] == 777 and s["busiest_thread_emulated"] == 5055


def test_several_threads_without_the_schedule_are_not_exact():
    # An old plugin (or one not given threads=N): a shared counter racing between threads.
    report = {"plugin": "insn_count", "format": 1, "exact": False, "spans": [30000, 19000, 19100]}
    s = instruction_summary(report, warmup=1, threads=4)
    assert not s["exact"] and s["method"] == "one thread"


def test_no_timed_span_is_an_error():
    with pytest.raises(VitqError, match="no complete inference"):
        instruction_summary({"spans": [5], "schedule": None}, warmup=1, threads=1)
