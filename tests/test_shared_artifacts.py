"""The session artifacts of tests/conftest.py under two pytest-xdist workers: a second caller
waits for the first one's export and reuses it, instead of exporting again (the exporter's own
lock would make it fail)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import conftest


def test_concurrent_callers_export_once_and_share(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")  # exported_artifact exports only where torch is installed
    import molmo_export.export

    exports: list[Path] = []

    def fake_export(model: str, target: str, out: Path, **kw: Any) -> Path:
        exports.append(out)
        time.sleep(0.5)  # long enough for the other caller to arrive mid-export
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text("{}")
        return out

    monkeypatch.setattr(conftest, "ARTIFACTS", tmp_path)
    monkeypatch.setattr(molmo_export.export, "export_artifact", fake_export)
    got: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            got.append(conftest.exported_artifact("shared", "demo"))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    # separate open()s of the lock file conflict under flock, in threads as in processes
    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert exports == [tmp_path / "shared"]  # one export, the other caller reused it
    assert got == [tmp_path / "shared"] * 2
    assert (tmp_path / "shared" / ".test-fingerprint").read_text() == \
        conftest._exporter_fingerprint()
    conftest.exported_artifact("shared", "demo")  # current now: no export at all
    assert len(exports) == 1
