"""molmo-eval on the demo artifact: the fp32 graphs and the fp16 graphs TensorRT builds from
(both in ONNX Runtime), a few held-out questions each (the full 600 are in docs/demo_model.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molmo_calibration.shapes.cli import main
from molmo_calibration.shapes.evaluate import TASKS

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-graphs"])
def test_molmo_eval_scores_an_artifact(demo_artifact: Path, tmp_path: Path, fp16: bool,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scores.json"
    rc = main([str(demo_artifact), "--questions", "12", "--threads", "1", "--json", str(out),
               *(["--fp16"] if fp16 else [])])
    assert rc == 0
    scores = json.loads(out.read_text())
    assert scores["questions"] == 12 and set(scores["tasks"]) == set(TASKS)
    assert sum(k["n"] for k in scores["kinds"].values()) == 12
    # the trained demo writes its answer formats (whatever it answers)
    assert scores["well_formed"] >= 0.75
    assert "| pointing |" in capsys.readouterr().out


def test_molmo_eval_refuses_a_missing_artifact(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nothing"), "--questions", "1"]) == 2
    assert capsys.readouterr().err.startswith("molmo-eval: error:")
