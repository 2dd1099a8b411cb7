"""Done-when of the export and runtime issues: the artifact exported from ../shared/golden/model,
run by molmo_runtime with ONNX Runtime in a process that never imports torch, reproduces the
official implementation's activations, prefill logits and all 20 greedy tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, golden_path

# ORT fp32 vs the official PyTorch fp32 run. The golden README (§5.5) measured a from-spec torch
# re-implementation at <= 1.7e-6 (vision features, |x| <= ~5), <= 1.5e-5 (connector output and
# embeddings, |x| <= 25) and <= 3.1e-6 (logits, |x| <= 4.2); ONNX Runtime reorders sums again,
# so each bound keeps ~5-10x headroom over that. Logits use the bound, 1e-4.
TOLERANCE = {
    "vision_features": 2e-5,
    "connector_output": 1e-4,
    "embeddings_in": 1e-4,
    "prefill_logits": 1e-4,
}


@pytest.fixture(scope="module")
def report(golden_artifact: Path) -> dict:
    golden = golden_path()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.runtime.golden_check", str(golden_artifact), str(golden)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_process_never_imports_torch(report: dict) -> None:
    assert report["torch_modules"] == []


@pytest.mark.parametrize("case", ["chelsea", "tiny_80x50", "text_only", "batch2_padded"])
def test_stages_within_tolerance(report: dict, case: str) -> None:
    res = report[case]
    for stage, bound in TOLERANCE.items():
        if stage in res:
            assert res[stage] <= bound, f"{case} {stage}: {res[stage]:.3e} > {bound:.0e}"


@pytest.mark.parametrize("case", ["chelsea", "tiny_80x50", "text_only", "batch2_padded"])
def test_all_20_greedy_tokens_match(report: dict, case: str) -> None:
    res = report[case]
    assert res["generated_ids"] == res["golden_ids"]
