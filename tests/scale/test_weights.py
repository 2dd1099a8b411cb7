"""CheckpointWeights: lazy per-parameter reads equal what from_pretrained loads."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from molmo_export.export.onnx_export import resolve_checkpoint  # noqa: E402
from molmo_export.model import MolmoForConditionalGeneration  # noqa: E402
from molmo_export.weights import CheckpointWeights  # noqa: E402


def test_every_parameter_equals_the_loaded_model() -> None:
    directory = resolve_checkpoint("demo")
    weights = CheckpointWeights(directory)
    model = MolmoForConditionalGeneration.from_pretrained(directory)
    params = dict(model.named_parameters())
    assert sorted(weights.names()) == sorted(params)
    for name, p in params.items():
        got = weights.get(name, torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, p), name
    half = weights.get("language_model.lm_head.weight", torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, params["language_model.lm_head.weight"].half())


def test_unknown_name_is_a_key_error() -> None:
    weights = CheckpointWeights(resolve_checkpoint("demo"))
    with pytest.raises(KeyError, match="not a parameter"):
        weights.get("vision.nope")


def test_rows_equal_the_rows_of_the_whole_parameter() -> None:
    """rows() reads a block of rows only; the embeddings are assembled from two official
    tensors (base + new rows), so blocks that straddle their border are included."""
    weights = CheckpointWeights(resolve_checkpoint("demo"))
    fused = 0
    for name, shape in weights.shapes.items():
        if len(shape) != 2:
            continue
        whole = weights.get(name, torch.float32)
        if weights.rows(name, 0, 1, torch.float32) is None:
            fused += 1
            continue
        step = max(1, shape[0] // 3 + 1)  # 3 blocks, the last one short
        for r0 in range(0, shape[0], step):
            r1 = min(r0 + step, shape[0])
            assert torch.equal(weights.rows(name, r0, r1, torch.float32), whole[r0:r1]), name
    emb = "language_model.model.embed_tokens.weight"
    rows = weights.shapes[emb][0]
    assert torch.equal(weights.rows(emb, rows - 130, rows - 1, torch.float32),
                       weights.get(emb, torch.float32)[rows - 130:rows - 1])  # across the border
    assert fused < len(weights.shapes)


def test_embeddings_by_rows_are_the_file_np_save_writes(tmp_path: Path) -> None:
    import numpy as np

    from molmo_export.export.streaming import save_embeddings_by_rows

    weights = CheckpointWeights(resolve_checkpoint("demo"))
    table = weights.get("language_model.model.embed_tokens.weight", torch.float32).numpy()
    np.save(tmp_path / "whole.npy", table)
    save_embeddings_by_rows(weights, tmp_path / "rows.npy", block_bytes=table.shape[1] * 4 * 100)
    assert (tmp_path / "rows.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()


def test_checkpoint_blocks_assemble_what_the_reader_reads() -> None:
    """The exporter's glue: a template location (weight, optional transpose) -> RowBlocks whose
    blocks, stacked (and transposed as the location asks), are the array the reader returns."""
    import numpy as np

    from molmo_export.export.streaming import WEIGHT_LOCATION, checkpoint_blocks, checkpoint_reader

    weights = CheckpointWeights(resolve_checkpoint("demo"))
    read = checkpoint_reader(weights)
    head = "language_model.lm_head.weight"
    cols = weights.shapes[head][1]
    blocks = checkpoint_blocks(weights, above=0, block_bytes=cols * 4 * 100)  # 512 rows: 6
    for location in (WEIGHT_LOCATION + head + "|1,0", WEIGHT_LOCATION + head):
        rb = blocks(location)
        assert rb is not None and rb.transposed == location.endswith("|1,0")
        assert len(rb.spans()) > 1
        stacked = np.concatenate([rb.read(a, b) for a, b in rb.spans()])
        np.testing.assert_array_equal(stacked.T if rb.transposed else stacked, read(location))
    assert checkpoint_blocks(weights)(WEIGHT_LOCATION + head) is None  # small: read whole
    assert blocks("other.onnx.data") is None
