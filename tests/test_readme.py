"""README.md runs as written: every ```bash and ```python block, in order, on the demo model.

The blocks run in a sandbox that looks like the checkout (a symlink to each top-level entry,
with its own empty `out/`), with `.venv` activated as the README asks, so `make demo` and
`--out out/...` write into the sandbox, never into the user's checkout. A block preceded by
`<!-- skip: REASON -->` (GPU, Jetson, the test suite itself, installing into a new environment)
is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!-- skip: (?P<skip>[^\n]*?) -->\n)?```(?P<lang>bash|python)\n"
                   r"(?P<code>.*?)```", re.S)
NOT_LINKED = {"out", "build", "dist", ".git", ".pytest_cache"}


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """(lang, code, skip reason or None) of every bash/python block, in order."""
    return [(m["lang"], m["code"], m["skip"]) for m in BLOCK.finditer(README.read_text())]


BLOCKS = readme_blocks()


def _id(i: int) -> str:
    lang, code, _ = BLOCKS[i]
    return f"{i}-{lang}-{re.sub(r'[^a-z0-9]+', '-', code.split(chr(10))[0].lower())[:30]}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    box = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in NOT_LINKED | {"pyproject.toml"}:
            (box / entry.name).symlink_to(entry)
    # The tests run inside .venv, so it is installed: a copy of pyproject.toml no newer than
    # .venv's stamp keeps make from rebuilding it in the sandbox (e.g. right after a pull).
    project = box / "pyproject.toml"
    shutil.copyfile(REPO / "pyproject.toml", project)
    stamp = REPO / ".venv" / ".installed"
    if stamp.exists():
        os.utime(project, (stamp.stat().st_mtime - 1, stamp.stat().st_mtime - 1))
    return box


def test_readme_is_short_and_has_runnable_blocks() -> None:
    assert len(README.read_text().splitlines()) <= 300
    runnable = [b for b in BLOCKS if b[2] is None]
    assert {lang for lang, _, _ in runnable} == {"bash", "python"}
    assert any("make demo" in code for _, code, _ in runnable)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=_id)
def test_readme_block_runs(index: int, sandbox: Path) -> None:
    lang, code, skip = BLOCKS[index]
    if skip:
        pytest.skip(f"README block marked: {skip}")
    venv = REPO / ".venv"
    env = {**os.environ, "VIRTUAL_ENV": str(venv),
           "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("OUT", None)  # make's OUT would redirect `make demo`
    cmd = ["bash", "-e", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=sandbox, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (f"README {lang} block failed (exit {proc.returncode}):\n{code}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr\n{proc.stderr[-3000:]}")
    if "make demo" in code:
        assert "verification passed" in proc.stdout and "artifact written to out/demo" in proc.stdout
