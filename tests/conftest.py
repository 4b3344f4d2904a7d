"""Session-wide hooks: the one-line figures of the fuzzer and the fault tests at the end of the run (carried
from pytest-xdist's workers to the controller), and, under
CI (``TPFX_NO_UNLISTED_SKIPS=1``, set by ``.ci/run``), a failed session when a test skipped for a reason the
README's "Tests that may skip" list does not name."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

FIGURES: list[str] = []  # lines tests add for the terminal summary
_SKIPS: list[tuple[str, str]] = []  # (test id, reason) of every skipped test
README = Path(__file__).resolve().parents[1] / "README.md"


def listed_skip_reasons(readme: str) -> list[str]:
    """The reasons (in backquotes, first on each bullet) under README's "Tests that may skip" heading."""
    m = re.search(r"^#+ Tests that may skip\n(.*?)(?=^#|\Z)", readme, re.M | re.S)
    return re.findall(r"^- `([^`]+)`", m.group(1), re.M) if m else []


def pytest_runtest_logreport(report: Any) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is not a skip
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _SKIPS.append((report.nodeid, reason))


def _unlisted_skips() -> list[tuple[str, str]]:
    """The skips (test, reason) whose reason README's 'Tests that may skip' does not list."""
    listed = listed_skip_reasons(README.read_text())
    return [(t, r) for t, r in _SKIPS if not any(a in r for a in listed)]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in FIGURES:
        terminalreporter.write_line(line)
    unlisted = _unlisted_skips()
    if unlisted and os.environ.get("TPFX_NO_UNLISTED_SKIPS"):
        terminalreporter.write_line("skipped for a reason README's 'Tests that may skip' does not list:", red=True)
        for test, reason in unlisted:
            terminalreporter.write_line(f"  {test}: {reason}", red=True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller: a worker finished; keep the figures its tests recorded."""
    FIGURES.extend(getattr(node, "workeroutput", {}).get("figures", []))


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if hasattr(session.config, "workeroutput"):  # an xdist worker: its figures travel to the controller
        session.config.workeroutput["figures"] = list(FIGURES)
    if os.environ.get("TPFX_NO_UNLISTED_SKIPS") and _unlisted_skips() and session.exitstatus == 0:
        session.exitstatus = 1
