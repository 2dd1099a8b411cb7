"""The demo's recorded quality-gate outcomes (molmo_export/weights/demo.gates.json) and the note
molmo-export prints, before any work, for a target recorded as failing on a built-in preset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

import molmo_export.demo as demo
from molmo_export.export import TARGETS

RECORD = demo.trained_weights("demo").with_suffix(".gates.json")


def test_the_record_is_measured_on_the_shipped_weights() -> None:
    """Retraining the demo must come with a re-measured record: a record of other weights would
    be ignored silently, so this fails instead."""
    record = json.loads(RECORD.read_text())
    digest = hashlib.sha256(demo.trained_weights("demo").read_bytes()).hexdigest()
    assert record["weights_sha256"] == digest, (
        "molmo_export/weights/demo.gates.json was measured on other weights: rerun "
        "`molmo-export --model demo --target T` for each target in it and update the record")
    assert record["measured"] and set(record["targets"]) <= set(TARGETS)
    for outcome in record["targets"].values():
        assert isinstance(outcome["passed"], bool) and outcome["summary"]
    assert demo.gate_record("demo") == record


FAKE: dict[str, Any] = {
    "measured": "2026-12-02, test",
    "targets": {"ort-int8": {"passed": False, "summary": "pointing -1.3 points, the gate allows 1"},
                "ort-int4": {"passed": True, "summary": "within 5 points"}}}


@pytest.fixture
def fake_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "gate_record", lambda name: FAKE if name == "demo" else None)


def test_a_target_recorded_as_failing_gets_a_note(fake_record: None) -> None:
    note = demo.known_gate_failure("demo", "ort-int8")
    assert note is not None
    assert "pointing -1.3 points" in note and "--allow-degraded" in note
    assert "ort-int4 passed on this model" in note
    assert demo.known_gate_failure("demo", "ort-int4") is None  # recorded as passing
    assert demo.known_gate_failure("demo", "trt-int8") is None  # not recorded
    assert demo.known_gate_failure("/data/my-checkpoint", "ort-int8") is None  # not a preset


def test_a_record_of_other_weights_is_ignored(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    weights = tmp_path / "demo.safetensors"
    weights.write_bytes(b"other weights")
    weights.with_suffix(".gates.json").write_text(json.dumps({**FAKE, "weights_sha256": "0" * 64}))
    monkeypatch.setattr(demo, "trained_weights", lambda name: weights)
    assert demo.gate_record("demo") is None
    assert demo.known_gate_failure("demo", "ort-int8") is None


def test_molmo_export_prints_the_note_before_any_work(
        fake_record: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import molmo_export.export as export
    from molmo_export.cli import main_export

    class Started(Exception):
        pass

    def export_artifact(*args: Any, **kwargs: Any) -> None:
        assert "ort-int8 has failed its quality gate" in capsys.readouterr().err
        raise Started

    monkeypatch.setattr(export, "export_artifact", export_artifact)
    with pytest.raises(Started):
        main_export(["--model", "demo", "--target", "ort-int8", "--out", str(tmp_path / "o"),
                     "--debug"])  # --debug: exceptions propagate
