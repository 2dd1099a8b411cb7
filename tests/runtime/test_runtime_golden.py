"""Done-when of the export and runtime issues: the artifacts exported from ../shared/golden/model
(and the 7B-O and MolmoE tiny models beside it), run by molmo_runtime with ONNX Runtime in a process that never imports torch, reproduces the
official implementation's activations, prefill logits and all 20 greedy tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from molmo_runtime.tolerances import TABLE
from tests.conftest import REPO, exported_artifact, golden_path

# ORT fp32 vs the official PyTorch fp32 run: rows "runtime_golden/<stage>" of
# molmo_runtime.tolerances (bound = rtol * max |golden|; why there).
STAGES = ("vision_features", "connector_output", "embeddings_in", "prefill_logits")


CASES = {
    "model": ["chelsea", "tiny_80x50", "text_only", "batch2_padded"],
    "model_7b_o": ["chelsea", "text_only"],
    "model_moe": ["tiny_80x50", "text_only"],
}
PARAMS = [(model, case) for model, cases in CASES.items() for case in cases]


@pytest.fixture(scope="module", params=list(CASES))
def report(request: pytest.FixtureRequest) -> tuple[str, dict]:
    model = request.param
    artifact = exported_artifact(f"golden-{model}", golden_path(model), max_seq_len=1024)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.runtime.golden_check", str(artifact), str(golden_path()),
         model], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_process_never_imports_torch(report: tuple[str, dict]) -> None:
    assert report[1]["torch_modules"] == []


def test_every_case_is_checked(report: tuple[str, dict]) -> None:
    model, res = report
    assert sorted(k for k in res if k != "torch_modules") == sorted(CASES[model])


def test_stages_within_tolerance(report: tuple[str, dict]) -> None:
    model, res = report
    for case in CASES[model]:
        for stage in STAGES:
            if stage in res[case]:
                got, scale = res[case][stage]
                tol = TABLE[f"runtime_golden/{stage}"]
                assert tol.check(got, scale), (f"{model}/{case} {stage}: {got:.3e} > "
                                               f"{tol.bound(scale):.3e} ({tol.reason})")


def test_all_20_greedy_tokens_match(report: tuple[str, dict]) -> None:
    model, res = report
    for case in CASES[model]:
        assert res[case]["generated_ids"] == res[case]["golden_ids"], f"{model}/{case}"
        assert len(res[case]["golden_ids"]) in (20, 2)  # 20 ids, or 2 rows of 20
