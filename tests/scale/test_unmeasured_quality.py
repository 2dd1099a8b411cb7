"""A quantized artifact that records "quality": {"measured": false} (streamed before the
layer-streamed reference existed, or from a checkpoint without a tokenizer): molmo-run says so
on every run, and molmo-verify says that there is nothing to hold it to, instead of loading a
reference model it cannot use (32 GB at 7B) and then failing on the missing quality report.
Streamed exports now measure their quality: tests/scale/test_layer_reference.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from molmo_runtime.manifest import Manifest, file_record, write_manifest
from tests.runtime.fake_artifact import fake_manifest

REASON = "streaming export: no fp32 reference run fits in memory; see docs/scale.md"


def _streamed_int4(out: Path) -> Path:
    raw = fake_manifest(out)
    raw.update(target="ort-int4",
               quantization={"target": "ort-int4", "precision": "int4",
                             "source": {"target": "checkpoint"}},
               calibration=None, quality={"measured": False, "reason": REASON},
               verification={"passed": None, "summary": "skipped (streaming export)"})
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    write_manifest(out, {**raw, "files": {rel: file_record(out, rel) for rel in files}})
    return out


def test_only_unmeasured_quantized_artifacts_carry_the_note(tmp_path: Path) -> None:
    note = Manifest(tmp_path, {"target": "ort-int4", "quantization": {"target": "ort-int4"},
                               "quality": {"measured": False, "reason": REASON}}
                    ).unmeasured_quality
    assert note is not None and "never measured" in note and REASON in note
    assert Manifest(tmp_path, {"target": "onnx"}).unmeasured_quality is None
    assert Manifest(tmp_path, {"target": "ort-int4", "quantization": {"target": "ort-int4"},
                               "quality": {"passed": True}}).unmeasured_quality is None


def test_molmo_verify_says_there_is_nothing_to_verify_against(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from molmo_export.cli import main_verify

    artifact = _streamed_int4(tmp_path / "int4")
    assert main_verify([str(artifact)]) == 2
    err = capsys.readouterr().err
    assert "nothing to verify against" in err and "never measured" in err
    assert "export it again" in err  # the fix
    assert "loading the reference" not in err  # refused before loading it


def test_molmo_run_notes_unmeasured_quality(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from molmo_runtime.cli import main

    artifact = _streamed_int4(tmp_path / "int4")
    main([str(artifact), "--prompt", "hello", "--max-new-tokens", "1"])  # (fake graphs)
    assert "molmo-run: note: the quality of this ort-int4 artifact was never measured" in \
        capsys.readouterr().err


def test_a_streamed_export_without_a_tokenizer_records_unmeasured_quality(
        tmp_path: Path, golden: Path) -> None:
    """The golden model has no tokenizer: the calibration prompts cannot be run, so the streamed
    quantized artifact says so instead of carrying a report."""
    pytest.importorskip("torch")
    from molmo_export.export import export_artifact
    from molmo_runtime.manifest import load_manifest

    lines: list[str] = []
    manifest = load_manifest(export_artifact(
        golden / "model", "ort-int8", tmp_path / "int8", max_seq_len=256, stream=True,
        verify=False, progress=False, log=lines.append))
    assert manifest.raw["quality"]["measured"] is False
    assert manifest.unmeasured_quality is not None and "no tokenizer" in \
        manifest.unmeasured_quality
    assert any("was not measured" in line for line in lines)
    assert "quality_report.json" not in manifest.files
