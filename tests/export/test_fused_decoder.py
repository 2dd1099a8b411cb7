"""Issue 18: the decoder graph made for ONNX Runtime (graph_io flavour "ort").

The golden tiny models' artifacts get the fused decoder; the torch-free runtime must reproduce
the official run (stage tolerances from the one table, all 20 greedy tokens identical), molmo-verify
must pass on unseen shapes, the int8/int4 fused graphs must match the portable graphs of the same
precision, and 7B-O / MolmoE must keep the portable graph with the reason in the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from molmo_export.export.fused_artifact import compare_decoders, fuse_decoder
from molmo_export.export.ort_decoder import build_fused_decoder, quantize_blockwise
from molmo_export.export.tensor_source import CheckpointTensors
from molmo_runtime.graph_io import DECODER
from molmo_runtime.manifest import load_manifest
from molmo_runtime.tolerances import TABLE
from tests.conftest import ARTIFACTS, REPO, exported_artifact, golden_path
from tests.runtime.test_runtime_golden import STAGES as GOLDEN_STAGES


def _fused_copy(name: str, model: str) -> Path:
    """The conftest's portable artifact of `model`, hard-linked, then fuse_decoder on it."""
    src = exported_artifact(f"golden-{model}", golden_path(model), max_seq_len=1024)
    out = ARTIFACTS / name
    stamp = (src / ".test-fingerprint").read_text()
    if (out / ".test-fingerprint").is_file() and (out / ".test-fingerprint").read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out, copy_function=os.link)
    fuse_decoder(out, CheckpointTensors(golden_path(model)), log=lambda s: None)
    (out / ".test-fingerprint").write_text(stamp)
    return out


@pytest.fixture(scope="module")
def fused_golden() -> Path:
    return _fused_copy("golden-model-fused", "model")


def test_manifest_says_fused_and_the_check_passed(fused_golden: Path) -> None:
    m = load_manifest(fused_golden)  # every file's sha256 matches
    assert m.decoder_flavour == "ort"
    check = m.raw["decoder_check"]
    assert check["max_abs_logits"] <= check["bound"] and check["same_top1"]
    ops = {n.op_type for n in onnx.load(str(m.path(m.graphs[DECODER].file)),
                                        load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert "Concat" not in {n.op_type for n in onnx.load(
        str(m.path(m.graphs[DECODER].file)), load_external_data=False).graph.node
        if n.name.startswith("l")}  # no per-layer cache concatenation


def test_golden_tokens_through_fused_graph_without_torch(fused_golden: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.runtime.golden_check", str(fused_golden),
         str(golden_path()), "model"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res.pop("torch_modules") == []
    assert sorted(res) == ["batch2_padded", "chelsea", "text_only", "tiny_80x50"]
    for case, r in res.items():
        assert r["generated_ids"] == r["golden_ids"], case
        for stage in GOLDEN_STAGES:  # the portable graph's golden bounds, from the one table
            if stage in r:
                got, scale = r[stage]
                tol = TABLE[f"runtime_golden/{stage}"]
                assert tol.check(got, scale), f"{case} {stage}: {got:.3e} > {tol.bound(scale):.3e}"


def test_molmo_verify_passes_on_fused_graph(fused_golden: Path) -> None:
    from molmo_export.verify import verify_artifact

    results = verify_artifact(fused_golden, golden_path("model"), greedy_tokens=8,
                              log=lambda s: None)
    stages = {r.stage for r in results}
    assert {"prefill_logits", "decode_logits", "present_kv", "greedy_tokens"} <= stages
    assert all(r.passed for r in results)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_fused_matches_portable(precision: str, tmp_path: Path) -> None:
    from molmo_calibration.ort_quant import quantize_for_ort
    from molmo_calibration.recipes import RECIPES

    src = exported_artifact("golden-model", golden_path("model"), max_seq_len=1024)
    m = load_manifest(src, "none")
    portable = tmp_path / "portable" / "decoder.onnx"
    quantize_for_ort(m.path(m.graphs[DECODER].file), portable,
                     RECIPES[f"ort-{precision}"].graphs[DECODER], m.dims.vocab_rows)
    fused = build_fused_decoder(CheckpointTensors(golden_path("model")), m.dims, precision,
                                tmp_path / "fused" / "decoder.onnx")
    check = compare_decoders(portable, fused, m, precision)  # raises above the table's bound
    assert check["same_top1"]
    ops = [n.op_type for n in onnx.load(str(fused), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 5 * m.dims.num_layers + 1  # qkv, o, gate, up, down; head


@pytest.mark.parametrize("target", ["ort-int8", "ort-int4"])
def test_fuse_decoder_replaces_a_quantized_artifacts_decoder(
        demo_quantized: Callable[[str], tuple[Path, Any]], target: str, tmp_path: Path) -> None:
    """What `molmo-export --target ort-int8/ort-int4` does after quantizing: the manifest's
    precision names ("int8-weight-only-nbits") map to the builder's and the table's rows."""
    quantized, _ = demo_quantized(target)
    out = tmp_path / target
    shutil.copytree(quantized, out)
    manifest = fuse_decoder(out, log=lambda s: None)
    assert manifest.raw["decoder_flavour"] == "ort"
    assert manifest.raw["decoder_check"]["same_top1"]
    load_manifest(out, verify="full")  # the rewritten artifact is whole


def test_blockwise_quantization_roundtrip() -> None:
    """MatMulNBits layout: B [N, k_blocks, blob] (low nibble first), scales [N, k_blocks],
    default zero point 2^(bits-1); each weight within one quantization step of its block."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)  # [N, K], K not a multiple of 64
    for bits, block in ((4, 32), (8, 64)):
        blocks = -(-96 // block)
        packed, scales = quantize_blockwise(w, bits, block)
        assert packed.shape == (48, blocks, block * bits // 8)
        assert scales.shape == (48, blocks)
        if bits == 8:
            q = packed.astype(np.int32) - 128
        else:
            q = np.stack([packed & 15, packed >> 4], -1).reshape(48, blocks, block)
            q = q.astype(np.int32) - 8
        step = np.repeat(np.abs(scales), block, axis=1)[:, :96]
        err = np.abs((q * scales[..., None]).reshape(48, -1)[:, :96] - w)  # K..padding unread
        assert (err <= step * (1 + 1e-5)).all()
        assert np.median(err / step) < 0.3  # rounding error, not a wrong layout


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_weights_written_in_row_blocks_are_the_same_bytes(
        precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder converts and quantizes big weights a block of rows at a time (memory at 7B);
    with blocks of a few rows every matrix is split, and the files must not change."""
    import molmo_export.export.ort_decoder as ort_decoder

    src = CheckpointTensors(golden_path("model"))
    dims = load_manifest(exported_artifact("golden-model", golden_path("model"),
                                           max_seq_len=1024), "none").dims
    files = []
    for rows_bytes in (ort_decoder.ROW_BLOCK_BYTES, 4096):
        monkeypatch.setattr(ort_decoder, "ROW_BLOCK_BYTES", rows_bytes)
        path = build_fused_decoder(src, dims, precision, tmp_path / str(rows_bytes) / "d.onnx")
        files.append((path.read_bytes(), path.with_name("d.onnx.data").read_bytes()))
    assert files[0] == files[1]


@pytest.mark.parametrize("model", ["model_7b_o", "model_moe"])
def test_variants_keep_portable_decoder_with_reason(model: str) -> None:
    out = _fused_copy(f"golden-{model}-fused", model)
    m = load_manifest(out)
    assert m.decoder_flavour == "portable"
    assert "post-norm" in m.raw["decoder_flavour_note"] or "experts" in \
        m.raw["decoder_flavour_note"]
    assert m.graphs[DECODER].output("present.0.key").dims[2] == "seq"


def test_tensor_source_reads_what_the_loader_loads() -> None:
    """CheckpointTensors (one tensor at a time, no model) = the loaded reference's parameters."""
    from molmo_export.model import MolmoForConditionalGeneration

    ref = MolmoForConditionalGeneration.from_pretrained(golden_path("model"))
    src = CheckpointTensors(golden_path("model"))
    names = [n for n, _ in ref.named_parameters() if n.startswith("language_model")]
    assert "language_model.model.embed_tokens.weight" in names  # assembled from two tensors
    for name, p in ref.named_parameters():
        if name in names:
            assert np.array_equal(src.get(name), p.detach().numpy()), name
