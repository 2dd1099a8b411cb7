"""`--write-skipped FILE` and `--only-listed FILE`: `make test` runs each torch-free test once.

The torch-free folders (tests/runtime, tests/calibration, tests/test_torch_free.py) run in the
environment without torch (make test-runtime), which writes the node ids of the tests that
skipped there (those that need torch, or an artifact only torch can export) to FILE; the torch
environment then runs just those (`--only-listed FILE`) instead of the whole folders again.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("molmo-export")
    group.addoption("--write-skipped", metavar="FILE", default=None,
                    help="write the node ids of the skipped tests (and modules) to FILE")
    group.addoption("--only-listed", metavar="FILE", default=None,
                    help="run only the tests FILE lists (as --write-skipped wrote it)")


def configure(config: pytest.Config) -> None:
    if config.getoption("write_skipped"):
        config.pluginmanager.register(_Writer(Path(config.getoption("write_skipped"))),
                                      "skipped-writer")
    listed = config.getoption("only_listed")
    if listed:
        if not Path(listed).is_file():
            raise pytest.UsageError(f"--only-listed {listed}: no such file (written by "
                                    "--write-skipped)")
        config.pluginmanager.register(_Only(Path(listed).read_text().split("\n")), "only-listed")


class _Writer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.skipped: set[str] = set()

    # a module that skips as a whole (importorskip at its top) is a skipped collect report
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.skipped.add(report.nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail did run
            self.skipped.add(report.nodeid)

    def pytest_sessionfinish(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(f"{nodeid}\n" for nodeid in sorted(self.skipped)))


class _Only:
    def __init__(self, nodeids: list[str]) -> None:
        self.nodeids = {n for n in nodeids if n}

    def _listed(self, item: pytest.Item) -> bool:
        return item.nodeid in self.nodeids or \
            any(item.nodeid.startswith(n + "::") for n in self.nodeids)

    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        keep = [item for item in items if self._listed(item)]
        config.hook.pytest_deselected(items=[item for item in items if not self._listed(item)])
        items[:] = keep

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # nothing skipped in the other environment: nothing to run here is a success
        if session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and not self.nodeids:
            session.exitstatus = pytest.ExitCode.OK
