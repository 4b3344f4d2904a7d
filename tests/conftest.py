"""Session-wide hooks: the plan fuzzer's one-line figure at the end of the run (tests/test_fuzz.py)."""

from __future__ import annotations

from typing import Any

FIGURES: list[str] = []  # lines tests add for the terminal summary


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in FIGURES:
        terminalreporter.write_line(line)
