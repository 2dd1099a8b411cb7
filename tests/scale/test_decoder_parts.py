"""The quantized decoder run in parts (molmo_calibration.decoder_parts): part graphs cut from the
artifact's fused decoder generate bit for bit what the whole graph generates, and a streamed
export that measures its quality that way writes the same report."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from molmo_calibration import decoder_parts  # noqa: E402
from molmo_calibration.calibration_set import load_calibration_set  # noqa: E402
from molmo_calibration.evaluate import (  # noqa: E402
    GraphRunner,
    encode_images,
    prepare_samples,
    run_sample,
)
from molmo_calibration.quantize import REPORT_JSON  # noqa: E402
from molmo_runtime.graph_io import DECODER  # noqa: E402
from molmo_runtime.manifest import load_manifest  # noqa: E402

NEW_TOKENS = 5


@pytest.mark.parametrize("parts", [2, 3])
def test_parts_generate_what_the_whole_decoder_generates(
        parts: int, demo_streamed: Callable[[str], Path], tmp_path: Path) -> None:
    manifest = load_manifest(demo_streamed("ort-int4"), "full")
    dims = manifest.dims
    files = {name: manifest.path(g.file) for name, g in manifest.graphs.items()}
    embed = np.load(manifest.path("embed_tokens.npy"))
    held = [s for s in prepare_samples(load_calibration_set(), manifest)
            if s.split == "heldout"][:3]
    whole = GraphRunner(files, dims, embed, threads=1)
    expected = [run_sample(whole, s, NEW_TOKENS) for s in held]
    encoded = [encode_images(whole, s) for s in held]

    split = decoder_parts.split_decoder(files[DECODER], dims.num_layers, parts, tmp_path)
    assert split is not None and len(split) == parts
    assert [list(p.layers) for p in split][0][0] == 0 and split[-1].outputs == ("logits",)
    assert sorted(i for p in split for i in p.layers) == list(range(dims.num_layers))
    data = tmp_path / "decoder.onnx.data"  # a link to the artifact's file, not a copy
    assert os.path.samefile(data, files[DECODER].with_name("decoder.onnx.data"))
    lines: list[str] = []
    got = decoder_parts.generate_in_parts(split, GraphRunner({}, dims, embed, 1), dims, held,
                                          encoded, NEW_TOKENS, 1, lines.append)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g.token_ids, e.token_ids)
        np.testing.assert_array_equal(g.step_logits, e.step_logits)  # bit for bit
    assert len(lines) == NEW_TOKENS


def test_a_graph_without_layer_boundaries_is_not_split(demo_artifact: Path,
                                                       tmp_path: Path) -> None:
    manifest = load_manifest(demo_artifact, "none")  # the portable decoder
    decoder = manifest.path(manifest.graphs[DECODER].file)
    assert decoder_parts.split_decoder(decoder, manifest.dims.num_layers, 2, tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_streamed_export_measured_in_parts_writes_the_same_report(
        demo_streamed: Callable[[str], Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the part size below the demo decoder's, the export's quality measurement runs the
    decoder in parts; its report equals the whole-graph export's, and no part file is left."""
    from molmo_calibration.report import QualityWarning
    from molmo_export.export import export_artifact

    whole = demo_streamed("ort-int4")
    size = sum(f.stat().st_size for f in (whole / "onnx").glob("decoder.onnx*"))
    monkeypatch.setattr(decoder_parts, "PART_BYTES", size // 3 + 1)  # 3 parts
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QualityWarning)
        out = export_artifact("demo", "ort-int4", tmp_path / "parts",
                              max_seq_len=load_manifest(whole, "none").dims.max_seq_len,
                              stream=True, verify=False, allow_degraded=True, progress=False,
                              log=lines.append)
    assert any("decoder in 3 parts (" in line for line in lines)
    got, expected = (json.loads((a / REPORT_JSON).read_text()) for a in (out, whole))
    assert got == expected
    listed = set(json.loads((out / "manifest.json").read_text())["files"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == listed | {"manifest.json"}


@pytest.mark.parametrize("how", ["name", "symlink"])
def test_data_outside_the_graphs_folder_is_refused_before_anything_is_linked(
        how: str, demo_streamed: Callable[[str], Path], tmp_path: Path) -> None:
    """A decoder whose external data leads out of its folder (by a '..' location or a symlink)
    is refused (ArtifactError) and nothing is linked: the split never reaches outside."""
    import onnx

    from molmo_runtime.errors import ArtifactError

    manifest = load_manifest(demo_streamed("ort-int4"), "none")
    art = tmp_path / "art"
    art.mkdir()
    outside = tmp_path / "outside.data"
    outside.write_bytes((manifest.path("onnx/decoder.onnx.data")).read_bytes())
    model = onnx.load(str(manifest.path("onnx/decoder.onnx")), load_external_data=False)
    if how == "name":
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = "../outside.data"
    else:
        (art / "decoder.onnx.data").symlink_to(outside)
    onnx.save(model, str(art / "decoder.onnx"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(ArtifactError, match="outside|normalised relative path"):
        decoder_parts.split_decoder(art / "decoder.onnx", manifest.dims.num_layers, 2, scratch)
    assert list(scratch.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "art", "outside.data", "scratch"]
