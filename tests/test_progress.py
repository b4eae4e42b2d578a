"""Progress off a terminal: a line with the ETA now and then, not a bar's carriage returns."""

from __future__ import annotations

import time

from vitq_edge import progress


def test_progress_in_a_log_writes_eta_lines_not_bars(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.01)
    monkeypatch.setattr(progress, "_quiet", False)  # an earlier in-process CLI test may have set --quiet
    items = []
    for i in progress.progress(range(4), "evaluating", unit="batch"):  # capsys: stderr is not a terminal
        time.sleep(0.02)
        items.append(i)
    err = capsys.readouterr().err
    assert items == [0, 1, 2, 3]
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("evaluating: 1/4 batch (") and "min left)" in lines[0]
    assert lines[-1].startswith("evaluating: 4/4 batch")


def test_short_work_and_quiet_runs_write_nothing(capsys, monkeypatch):
    assert list(progress.progress(iter(range(3)), "reading")) == [0, 1, 2]  # under LOG_EVERY_S: silent
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(progress, "_quiet", True)
    assert list(progress.progress(range(3), "reading")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
