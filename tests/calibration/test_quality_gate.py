"""Below the thresholds an export fails with the numbers and writes nothing, or warns and marks
the artifact with allow_degraded; bad sources and targets get clear errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from molmo_calibration.evaluate import PreparedSample
from molmo_calibration.quantize import quantize_prepared
from molmo_calibration.report import QualityError, QualityReport, QualityWarning, Thresholds
from molmo_runtime.errors import ArtifactError, InputError
from molmo_runtime.manifest import load_manifest
from tests.calibration.conftest import SYNTHETIC_SET

# Stricter than any int8 result can be (measured vision cosine on the toy: ~0.99985).
UNREACHABLE = Thresholds(vision_cosine=0.9999999, decoder_top1=1.01)


def _run(src: Path, out: Path, samples: list[PreparedSample], **kw: object) -> QualityReport:
    return quantize_prepared(load_manifest(src), out, "ort-int8", samples, SYNTHETIC_SET,
                             progress=False, log=lambda s: None, **kw)  # type: ignore[arg-type]


def test_below_thresholds_raises_with_the_numbers_and_writes_nothing(
        toy_artifact: Path, toy_samples: list[PreparedSample], tmp_path: Path) -> None:
    out = tmp_path / "int8"
    with pytest.raises(QualityError) as err:
        _run(toy_artifact, out, toy_samples, thresholds=UNREACHABLE)
    message = str(err.value)
    assert "vision-feature cosine 0.99" in message and "< 0.9999999" in message
    assert "decoder top-1 agreement" in message and "--allow-degraded" in message
    assert err.value.report.failures and not err.value.report.passed
    assert not out.exists() or not any(out.iterdir())


def test_failed_run_leaves_a_previous_artifact_untouched(
        toy_artifact: Path, toy_samples: list[PreparedSample], quantized: Callable[..., tuple],
        tmp_path: Path) -> None:
    import shutil

    previous, _ = quantized("ort-int8")
    out = tmp_path / "keep"
    shutil.copytree(previous, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(QualityError):
        _run(toy_artifact, out, toy_samples, thresholds=UNREACHABLE)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    load_manifest(out, verify="full")


def test_allow_degraded_warns_and_marks_the_artifact(
        toy_artifact: Path, toy_samples: list[PreparedSample], tmp_path: Path) -> None:
    out = tmp_path / "degraded"
    with pytest.warns(QualityWarning, match="below the quality thresholds"):
        report = _run(toy_artifact, out, toy_samples, thresholds=UNREACHABLE,
                      allow_degraded=True)
    m = load_manifest(out)
    assert m.raw["quality"]["passed"] is False and not report.passed
    saved = json.loads((out / "quality_report.json").read_text())
    assert saved["failures"] == report.failures and saved["passed"] is False
    assert "BELOW THRESHOLDS" in (out / "quality_report.md").read_text()


def test_a_quantized_source_is_refused(quantized: Callable[..., tuple],
                                       toy_samples: list[PreparedSample], tmp_path: Path) -> None:
    int8, _ = quantized("ort-int8")
    with pytest.raises(ArtifactError, match="quantize an fp32 one"):
        from molmo_calibration.quantize import quantize_artifact

        quantize_artifact(int8, tmp_path / "again", "ort-int4", progress=False)


def test_unknown_target_and_missing_split(toy_artifact: Path,
                                          toy_samples: list[PreparedSample],
                                          tmp_path: Path) -> None:
    m = load_manifest(toy_artifact)
    with pytest.raises(InputError, match="ort-int8, ort-int4, trt-int8-qdq"):
        quantize_prepared(m, tmp_path / "x", "ort-int3", toy_samples, SYNTHETIC_SET)  # type: ignore[arg-type]
    calibration_only = [s for s in toy_samples if s.split == "calibration"]
    with pytest.raises(InputError, match="held-out"):
        quantize_prepared(m, tmp_path / "y", "ort-int8", calibration_only, SYNTHETIC_SET)


def test_user_files_in_out_are_not_overwritten_without_force(
        toy_artifact: Path, toy_samples: list[PreparedSample], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="--force"):
        _run(toy_artifact, out, toy_samples)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
