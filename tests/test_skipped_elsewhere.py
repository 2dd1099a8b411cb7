"""make test runs each torch-free test once (tests/skipped_elsewhere.py): the run without torch
lists what skipped there, whole modules included, and the run with torch runs exactly that."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

CASES = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("needs torch")

@pytest.fixture
def artifact():
    pytest.skip("not exported yet")

def test_skips_in_setup(artifact):
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_one_param_skips(n):
    if n == 2:
        pytest.skip("needs torch")

@pytest.mark.xfail(strict=True)
def test_expected_failure():  # ran, so not listed
    assert False
"""
SKIPPED_MODULE = """
import pytest
pytest.importorskip("a_module_that_is_not_installed")

def test_in_skipped_module():
    pass
"""


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest",
                           "-p", "no:cacheprovider", "-v", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


def test_what_skipped_runs_next_time_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_module.py").write_text(SKIPPED_MODULE)
    listed = tmp_path / "skipped.txt"
    first = _pytest(tmp_path, "--write-skipped", str(listed))
    assert first.returncode == 0, first.stdout[-2000:]
    assert listed.read_text().splitlines() == [
        "test_cases.py::test_one_param_skips[2]", "test_cases.py::test_skips",
        "test_cases.py::test_skips_in_setup", "test_module.py"]

    (tmp_path / "test_module.py").write_text(SKIPPED_MODULE.replace(
        'pytest.importorskip("a_module_that_is_not_installed")', ""))  # "torch" is here now
    second = _pytest(tmp_path, "--only-listed", str(listed))
    assert second.returncode == 0, second.stdout[-2000:]
    ran = {line.split(" ")[0] for line in second.stdout.splitlines()
           if line.endswith("%]")}
    assert ran == {"test_cases.py::test_one_param_skips[2]", "test_cases.py::test_skips",
                   "test_cases.py::test_skips_in_setup", "test_module.py::test_in_skipped_module"}
    assert "1 passed, 3 skipped, 3 deselected" in second.stdout


def test_an_empty_list_passes_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "empty.txt").write_text("")
    nothing = _pytest(tmp_path, "--only-listed", str(tmp_path / "empty.txt"))
    assert nothing.returncode == 0 and "6 deselected" in nothing.stdout, nothing.stdout[-2000:]
    missing = _pytest(tmp_path, "--only-listed", str(tmp_path / "absent.txt"))
    assert missing.returncode == 4 and "absent.txt: no such file" in missing.stderr
