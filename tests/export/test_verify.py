"""molmo-verify: stage-wise ORT vs PyTorch on shapes other than the export shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
    assert "max abs" in lines[0] and lines[-1].startswith("verification passed")


def test_verify_catches_a_model_that_differs(golden_artifact: Path) -> None:
    ref = MolmoForConditionalGeneration.from_pretrained(golden_path("model"))
    with torch.no_grad():
        ref.language_model.lm_head.weight[:, 0] += 0.05  # a small, real difference
    with pytest.raises(MolmoError, match="prefill_logits"):
        verify_artifact(golden_artifact, ref, log=lambda s: None)
