"""The layer-streamed fp32 reference (molmo_export.layer_reference) and what uses it: the quality
measurement of a streamed quantized export, and molmo-verify where the model is too big to load.

The reference holds one submodule's weights at a time but computes with the reference model's
own modules, so it equals the whole model within the fp32 bounds of the one tolerance table;
a streamed export's quality report is the in-memory path's report with that reference in place
of the fp32 graphs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("molmo_runtime.processing", reason="MolmoProcessor not available")

from molmo_calibration.calibration_set import load_calibration_set  # noqa: E402
from molmo_calibration.evaluate import prepare_samples, run_sample  # noqa: E402
from molmo_calibration.quantize import REPORT_JSON  # noqa: E402
from molmo_calibration.report import QualityError  # noqa: E402
from molmo_export.export.onnx_export import resolve_checkpoint  # noqa: E402
from molmo_export.layer_reference import REFERENCE, LayerStreamedReference  # noqa: E402
from molmo_export.model import MolmoForConditionalGeneration  # noqa: E402
from molmo_export.quantized_check import TorchRunner  # noqa: E402
from molmo_export.weights import CheckpointWeights  # noqa: E402
from molmo_runtime.manifest import load_manifest  # noqa: E402
from molmo_runtime.tolerances import TABLE  # noqa: E402

NEW_TOKENS = 6


def _within(row: str, got: np.ndarray, ref: np.ndarray) -> None:
    bound = TABLE[row].bound(float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= bound, f"{row}: {err:.3g} > {bound:.3g}"


def test_layer_streamed_reference_equals_the_whole_model(demo_artifact: Path) -> None:
    """Teacher-forced on the whole model's own greedy tokens, the layer-streamed reference gives
    its vision features, image tokens and logits at every step within the fp32 bounds (prefill
    and KV-cached decode against one causal pass), and leaves no weight materialised."""
    torch.set_num_threads(1)
    manifest = load_manifest(demo_artifact, "none")
    held = [s for s in prepare_samples(load_calibration_set(), manifest) if s.split == "heldout"]
    held = held[:2] + [held[-1]]  # two prompts on one image, one on another
    weights = CheckpointWeights(resolve_checkpoint("demo"))
    whole = TorchRunner(MolmoForConditionalGeneration.from_pretrained(
        resolve_checkpoint("demo")).eval(), manifest.dims)
    with torch.no_grad():
        expected = [run_sample(whole, s, NEW_TOKENS) for s in held]  # type: ignore[arg-type]
    cols = weights.shapes["language_model.lm_head.weight"][1]
    lines: list[str] = []
    streamed = LayerStreamedReference(weights, lines.append, head_block_bytes=cols * 4 * 997)
    got = streamed.traces(held, [t.token_ids for t in expected])
    for g, e in zip(got, expected):
        assert g.features is not None and e.features is not None
        _within("verify/vision_features", g.features, e.features)
        assert g.image_tokens is not None and e.image_tokens is not None
        _within("verify/connector_tokens", g.image_tokens, e.image_tokens)
        assert g.step_logits.shape == e.step_logits.shape == (NEW_TOKENS,
                                                              manifest.dims.vocab_rows)
        _within("verify/prefill_logits", g.step_logits[0], e.step_logits[0])
        _within("verify/decode_logits", g.step_logits[1:], e.step_logits[1:])
        assert np.array_equal(g.token_ids, e.token_ids)  # the demo's margins are far above it
    assert all(p.is_meta for p in streamed.skeleton.parameters())  # every weight freed
    layers = weights.config.text.num_layers
    assert sum(line.startswith("[reference] decoder layer") for line in lines) == layers


@pytest.mark.parametrize("target", ["ort-int8", "ort-int4"])
def test_streamed_export_measures_the_in_memory_paths_quality(
        target: str, demo_streamed: Callable[[str], Path],
        demo_quantized: Callable[[str], tuple[Path, Any]]) -> None:
    """The streamed export writes the quality report the in-memory path writes (same keys, the
    reference named) on the same held-out samples and tokens, and its numbers are close: the
    encoders are the same int8 graphs against an fp32 reference equal to the fp32 graphs within
    fp32 bounds; the decoder compares the quantized model's own greedy tokens instead of the
    fp32 ones, so a near-tie flip moves its positions and the numbers move by a few of them."""
    streamed = load_manifest(demo_streamed(target), "full")
    _, in_memory = demo_quantized(target)
    quality = streamed.raw["quality"]
    assert quality["measured"] is True and quality["reference"] == REFERENCE
    assert streamed.raw["calibration"] == in_memory.calibration
    report = json.loads(streamed.path(REPORT_JSON).read_text())
    assert set(report) == set(in_memory.to_dict()) | {"reference"}
    assert report["reference"] == REFERENCE
    assert report["new_tokens"] == in_memory.new_tokens
    assert quality["decoder_top1"] == round(report["decoder"]["top1"], 6)
    stages, ref_stages = report["stages"], in_memory.stages
    assert set(stages) == set(ref_stages)
    for name in ("vision_features", "image_tokens"):
        assert abs(stages[name]["cosine_min"] - ref_stages[name].cosine_min) < 1e-5, name
    assert abs(stages["prefill_logits"]["cosine_min"]
               - ref_stages["prefill_logits"].cosine_min) < 1e-3
    decoder, ref_decoder = report["decoder"], in_memory.decoder
    assert decoder["positions"] == ref_decoder.positions
    assert decoder["prefill_top1"] == ref_decoder.prefill_top1
    assert abs(decoder["top1"] - ref_decoder.top1) <= 4 / ref_decoder.positions
    assert 0.5 < decoder["kl_mean"] / ref_decoder.kl_mean < 2


def test_molmo_verify_checks_a_streamed_artifact_layer_by_layer(
        demo_streamed: Callable[[str], Path]) -> None:
    """molmo-verify with the layer-streamed reference (what it uses for a checkpoint too big to
    load) re-measures the export's own numbers: the same computation, the same figures."""
    from molmo_export.verify import verify_artifact

    out = demo_streamed("ort-int8")
    report = json.loads((out / REPORT_JSON).read_text())
    lines: list[str] = []
    results = {r.stage: r for r in verify_artifact(out, "demo", log=lines.append,
                                                   layer_streamed=True)}
    assert any(line.startswith("[molmo-verify] reference: layer-streamed") for line in lines)
    assert not any("loading the reference model" in line for line in lines)
    assert results["vision_features"].cosine == report["stages"]["vision_features"]["cosine_min"]
    assert report["decoder"]["top1"] >= report["thresholds"]["decoder_top1"]
    assert all(r.passed for r in results.values())


def test_streamed_export_below_the_gate_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-memory path's gate and error: below the thresholds, nothing is committed."""
    from molmo_calibration import report
    from molmo_export.export import export_artifact

    strict = report.Thresholds(decoder_top1=1.01)
    monkeypatch.setattr(report, "Thresholds", lambda: strict)
    out = tmp_path / "int8"
    with pytest.raises(QualityError, match="below the quality thresholds.*--allow-degraded"):
        export_artifact("demo", "ort-int8", out, max_seq_len=1024, stream=True, verify=False,
                        progress=False, log=lambda s: None)
    assert not (out / "manifest.json").exists()
