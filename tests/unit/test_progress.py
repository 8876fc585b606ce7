"""Progress without a terminal: plain lines (step, loss, tok/s, ETA), at most one per interval, and the last step."""

from __future__ import annotations

from tunelab.train import progress


def test_plain_lines_when_stdout_is_not_a_terminal(monkeypatch, capsys):
    clock = iter([100.0, 101.0, 103.0, 135.0, 150.0, 170.0])  # start, then one reading per update
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.ProgressBar(enabled=True)  # pytest captures stdout: not a terminal
    assert bar.plain
    bar.start(total=40, completed=0)
    for step, loss in ((10, 5.5), (20, 5.0), (30, 4.5), (40, 4.25)):
        bar.update(step, loss=loss, tok_s=1234.4)
    bar.stop()
    lines = capsys.readouterr().out.splitlines()
    # step 10 at 1 s: the first line; step 20 at 3 s: within 30 s of it, skipped; step 30 at 35 s;
    # step 40, the last: always. ETA = seconds per step so far x steps left.
    assert lines == ["step 10/40  loss 5.5000  1,234 tok/s  ETA 0:00:03",
                     "step 30/40  loss 4.5000  1,234 tok/s  ETA 0:00:12",
                     "step 40/40  loss 4.2500  1,234 tok/s  ETA 0:00:00"]


def test_a_resumed_run_measures_its_eta_from_where_it_resumed(monkeypatch, capsys):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.ProgressBar(enabled=True, plain=True)
    bar.start(total=200, completed=100)
    bar.update(110, loss=3.0, tok_s=10.0)
    assert capsys.readouterr().out == "step 110/200  loss 3.0000  10 tok/s  ETA 0:01:30\n"


def test_quiet_prints_nothing(capsys):
    bar = progress.ProgressBar(enabled=False, plain=True)
    bar.start(total=10, completed=0)
    bar.update(10, loss=1.0, tok_s=1.0)
    bar.stop()
    assert capsys.readouterr().out == ""
