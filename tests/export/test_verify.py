"""molmo-verify: stage-wise ORT vs PyTorch on shapes other than the export shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from molmo_calibration.report import QualityReport, Thresholds
from molmo_export.export.onnx_export import resolve_checkpoint
from molmo_export.model import MolmoForConditionalGeneration
from molmo_export.verify import verify_artifact
from molmo_runtime.errors import MolmoError
from tests.conftest import golden_path

pytestmark = pytest.mark.slow
STAGES = {"vision_features", "connector_tokens", "prefill_logits", "decode_logits",
          "present_kv", "greedy_tokens"}


def test_verify_passes_on_golden_model(golden_artifact: Path) -> None:
    results = verify_artifact(golden_artifact, golden_path("model"), log=lambda s: None)
    assert {r.stage for r in results} == STAGES and all(r.passed for r in results)
    crops = {r.case for r in results if r.stage == "vision_features"}
    assert crops == {"crops=1", "crops=2", "crops=5", "crops=13"}


def test_verify_passes_on_demo_model(demo_artifact: Path) -> None:
    lines: list[str] = []
    results = verify_artifact(demo_artifact, "demo", log=lines.append)
    assert all(r.passed for r in results)
    # progress: one line per stage as it completes, with its time, then the table
    progress = [line for line in lines if line.startswith("[molmo-verify ")]
    assert len(progress) == 4 and all(line.endswith(" s)") and " ok " in line
                                      for line in progress), progress
    table = next(i for i, line in enumerate(lines) if "max abs" in line)
    assert lines.index(progress[-1]) < table and lines[-1].startswith("verification passed")


@pytest.fixture
def demo_int8(demo_quantized: Callable[[str], tuple[Path, QualityReport]]
              ) -> tuple[Path, QualityReport]:
    return demo_quantized("ort-int8")


def test_verify_holds_a_quantized_artifact_to_its_quality_gate(
        demo_int8: tuple[Path, QualityReport]) -> None:
    """ort-int8 is far from fp32 by design: verify re-measures its quality report's metrics
    against its thresholds (not the fp32 bounds): the same numbers and the same verdict as the
    gate, so an artifact that passed its gate passes. (Its top-1 leaves out positions where
    fp32's own top-1 is undefined to fp32 precision: near-ties below ~3e-4 logits.)"""
    from molmo_export.quantized_check import verify_quantized

    out, report = demo_int8
    lines: list[str] = []
    results = verify_quantized(out, MolmoForConditionalGeneration.from_pretrained(
        resolve_checkpoint("demo")), log=lines.append)
    assert [r.stage for r in results] == ["vision_features", "image_tokens", "prefill_logits",
                                          "decoder_top1"]
    assert sum(line.startswith("[molmo-verify ") for line in lines) == report.decoder.samples
    vision, top1 = results[0], results[-1]
    thresholds = report.thresholds
    assert (vision.tolerance, top1.tolerance) == (thresholds.vision_cosine,
                                                  thresholds.decoder_top1)
    # torch stands in for the fp32 graphs: they agree to ~1e-6, so the gate's numbers come back
    assert abs(vision.cosine - report.stages["vision_features"].cosine_min) < 1e-4
    assert abs(top1.cosine - report.decoder.top1) <= 2 / report.decoder.positions
    assert vision.passed == (vision.cosine >= thresholds.vision_cosine)
    assert top1.passed == (top1.cosine >= thresholds.decoder_top1)
    if report.passed:
        verify_artifact(out, "demo", log=lambda s: None)  # raises if any check fails


def test_verify_fails_a_quantized_artifact_below_its_thresholds(
        demo_int8: tuple[Path, QualityReport], monkeypatch: pytest.MonkeyPatch) -> None:
    from molmo_export import quantized_check

    strict = Thresholds(vision_cosine=0.9999999, decoder_top1=1.0)
    monkeypatch.setattr(quantized_check, "Thresholds", lambda **kw: strict)
    with pytest.raises(MolmoError, match="vision_features"):
        verify_artifact(demo_int8[0], "demo", log=lambda s: None)


def test_verify_catches_a_model_that_differs(golden_artifact: Path) -> None:
    ref = MolmoForConditionalGeneration.from_pretrained(golden_path("model"))
    with torch.no_grad():
        ref.language_model.lm_head.weight[:, 0] += 0.05  # a small, real difference
    with pytest.raises(MolmoError, match="prefill_logits"):
        verify_artifact(golden_artifact, ref, log=lambda s: None)
