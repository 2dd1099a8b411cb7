"""`--cpu-durations=N`: the N tests that used the most CPU time, beside their wall time.

On a shared machine wall times grow with the load; the CPU seconds a test spends (all threads of
the test process plus the subprocesses it waited for) stay close to what it costs on an idle
one, so before/after comparisons of the suite's speed use them. A test running ONNX Runtime or
torch on 2 threads can show more CPU seconds than wall seconds. Each test's figure travels in
`report.user_properties`, so it reaches the controller under pytest-xdist too.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Generator

import pytest

_KEY = "cpu_seconds"
_PHASE_CPU = pytest.StashKey[float]()


def add_option(parser: pytest.Parser) -> None:
    parser.getgroup("terminal reporting").addoption(
        "--cpu-durations", type=int, default=None, metavar="N",
        help="show the N tests with the most CPU seconds (0 for all), with their wall time")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(item: pytest.Item) -> Generator[None, None, None]:
    start = _cpu()
    yield
    item.stash[_PHASE_CPU] = _cpu() - start


class _Timer:
    # setup, call and teardown each run inside their hook, then get their report
    pytest_runtest_setup = staticmethod(pytest.hookimpl(hookwrapper=True)(_timed))
    pytest_runtest_call = staticmethod(pytest.hookimpl(hookwrapper=True)(_timed))
    pytest_runtest_teardown = staticmethod(pytest.hookimpl(hookwrapper=True)(_timed))

    @staticmethod
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: pytest.Item
                                  ) -> Generator[None, pytest.TestReport, None]:
        outcome = yield
        if _PHASE_CPU in item.stash:
            outcome.get_result().user_properties.append((_KEY, item.stash[_PHASE_CPU]))
            del item.stash[_PHASE_CPU]


class _Summary:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.wall[report.nodeid] += report.duration
        self.cpu[report.nodeid] += sum(v for k, v in report.user_properties if k == _KEY)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tr = terminalreporter
        ranked = sorted(self.cpu, key=self.cpu.__getitem__, reverse=True)
        tr.write_sep("=", f"CPU seconds per test (setup+call+teardown), top {self.limit or 'all'}")
        for nodeid in ranked[:self.limit or None]:
            tr.write_line(f"{self.cpu[nodeid]:8.1f} cpu {self.wall[nodeid]:8.1f} wall  {nodeid}")
        tr.write_line(f"{sum(self.cpu.values()):8.1f} cpu {sum(self.wall.values()):8.1f} wall  "
                      f"total of {len(self.cpu)} tests")


def configure(config: pytest.Config) -> None:
    limit = config.getoption("--cpu-durations")
    if limit is None:
        return
    config.pluginmanager.register(_Timer(), "cpu-durations-timer")
    # under xdist only the controller (no workerinput) prints the table
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Summary(limit), "cpu-durations-summary")
