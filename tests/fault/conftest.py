"""Prints the fault suite's table of counts at the end of a run that included it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from tests.fault.report import REPORT, table


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    terminalreporter.write_sep("=", "fault suite: counts")
    terminalreporter.write_line(table())
    target = os.environ.get("TENANTFLOW_TEST_FAULT_REPORT")
    if target:
        Path(target).write_text(json.dumps([dataclasses.asdict(c) for c in REPORT], indent=2))
