"""Progress: a bar in a terminal, plain timed lines when stderr is a file (a scheduler's log)."""

from __future__ import annotations

import io

from rich.console import Console

from medmvl_cli.progress import JobProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=120), buffer


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setenv("MEDMVL_PROGRESS_SECONDS", "0")
    console, buffer = _console(terminal=False)
    with JobProgress("infer", console, unit="items") as progress:
        for done in range(1, 5):
            progress.update(done, 4, "loss 0.5000")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("infer: 2/4 (50%), loss 0.5000, ")
    assert "items/s" in lines[1] and "ETA 0:00:" in lines[1] and "elapsed" in lines[1]
    assert "\x1b[" not in buffer.getvalue()  # no escape codes in a log file


def test_plain_lines_are_spaced_by_the_interval(monkeypatch):
    monkeypatch.setenv("MEDMVL_PROGRESS_SECONDS", "3600")
    console, buffer = _console(terminal=False)
    with JobProgress("training", console) as progress:
        for done in range(100):
            progress.update(done, 100)
    assert buffer.getvalue() == ""


def test_a_terminal_gets_the_bar_not_lines(monkeypatch):
    monkeypatch.setenv("MEDMVL_PROGRESS_SECONDS", "0")
    console, buffer = _console(terminal=True)
    with JobProgress("infer", console) as progress:
        assert progress.bar is not None
        progress.update(1, 2)
    assert "infer: 1/2" not in buffer.getvalue()


def test_disabled_prints_nothing(monkeypatch):
    monkeypatch.setenv("MEDMVL_PROGRESS_SECONDS", "0")
    for terminal in (True, False):
        console, buffer = _console(terminal)
        with JobProgress("infer", console, enabled=False) as progress:
            progress.update(1, 2)
        assert buffer.getvalue() == ""
