"""Weights written in row blocks (molmo_calibration.streaming.RowBlocks): the 72B LM head and
embeddings are 5 GB each in fp32; read whole, quantizing the LM head peaked at ~15 GB.

1. The blocked writer gives the same graph as reading the weight whole: the same initializers
   (exactly), the same nodes, the same outputs, for fp32 / fp16 storage and 8- / 4-bit
   MatMulNBits, with a row count that the block size does not divide.
2. Its peak memory is a few blocks plus what it must hold (the per-block scales), not the
   weight: measured as the growth of the peak RSS (VmHWM, tests/scale/rss.py) of a child process writing a
   268 MB and a 537 MB weight, blocked, and of the 268 MB one read whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from molmo_calibration.streaming import NBits, RowBlocks, write_graph  # noqa: E402
from tests.scale import rss  # noqa: E402
from tests.scale.rss import current_rss, peak_rss  # noqa: E402

LOCATION = "source:W"


def source_rows(r0: int, r1: int, cols: int) -> np.ndarray:
    """Rows [r0, r1) of a deterministic [rows, cols] float32 weight (any block of it alone)."""
    r = np.arange(r0, r1, dtype=np.float32)[:, None]
    c = np.arange(cols, dtype=np.float32)[None, :]
    return np.sin(r * 0.37 + c * 0.011).astype(np.float32) * (1 + (r % 7)) * 0.02


def template(rows: int, cols: int, transposed: bool) -> onnx.ModelProto:
    """y = x @ B, B = source.T ([cols, rows]; a Linear weight as MatMul's B) or source
    ([rows, cols]), an external initializer the reader resolves."""
    k, n = (cols, rows) if transposed else (rows, cols)
    weight = onnx.TensorProto(name="W", dims=[k, n], data_type=onnx.TensorProto.FLOAT,
                              data_location=onnx.TensorProto.EXTERNAL)
    entry = weight.external_data.add()
    entry.key, entry.value = "location", LOCATION
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"], name="head")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, n])],
        initializer=[weight])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def whole_reader(rows: int, cols: int, transposed: bool):  # noqa: ANN201
    def read(location: str) -> np.ndarray | None:
        if location != LOCATION:
            return None
        w = np.empty((rows, cols), np.float32)
        for r0 in range(0, rows, 4096):
            w[r0:r0 + 4096] = source_rows(r0, min(r0 + 4096, rows), cols)
        return np.ascontiguousarray(w.T) if transposed else w
    return read


def block_reader(rows: int, cols: int, transposed: bool, block_rows: int,
                 calls: list[tuple[int, int]] | None = None):  # noqa: ANN201
    def read(r0: int, r1: int) -> np.ndarray:
        if calls is not None:
            calls.append((r0, r1))
        return source_rows(r0, r1, cols)

    def blocks(location: str) -> RowBlocks | None:
        return RowBlocks(rows, cols, transposed, read, block_rows) if location == LOCATION \
            else None
    return blocks


def write(dest: Path, rows: int, cols: int, transposed: bool, block_rows: int | None,
          dtype: str = "fp32", nbits: NBits | None = None,
          calls: list[tuple[int, int]] | None = None) -> Path:
    return write_graph(template(rows, cols, transposed), dest,
                       read=whole_reader(rows, cols, transposed), dtype=dtype, nbits=nbits,
                       blocks=None if block_rows is None else
                       block_reader(rows, cols, transposed, block_rows, calls))


CASES = {
    "fp32 transposed": dict(transposed=True),
    "fp32": dict(transposed=False),
    "fp16 transposed": dict(transposed=True, dtype="fp16"),
    "fp16": dict(transposed=False, dtype="fp16"),
    "int8 head (wider than the rest)": dict(transposed=True, nbits=NBits(4, 32, 8, vocab_rows=1000)),
    "int4": dict(transposed=True, nbits=NBits(4, 32, None, vocab_rows=7)),
    "int8, not transposed (read whole)": dict(transposed=False,
                                              nbits=NBits(8, 32, None, vocab_rows=7)),
}


@pytest.mark.parametrize("case", CASES)
def test_row_blocks_give_the_graph_of_the_whole_weight(case: str, tmp_path: Path) -> None:
    rows, cols = 1000, 96  # 1000 rows in blocks of 96: the last block is short (40)
    kw = CASES[case]
    calls: list[tuple[int, int]] = []
    blocked = write(tmp_path / "blocked" / "g.onnx", rows, cols, block_rows=96, calls=calls,
                    **kw)
    # MatMulNBits blocks only along the columns of B: a weight not transposed is read whole
    blocked_path = kw["transposed"] or not kw.get("nbits")
    assert calls == ([(r, min(r + 96, rows)) for r in range(0, rows, 96)] if blocked_path
                     else [])
    whole = write(tmp_path / "whole" / "g.onnx", rows, cols, block_rows=None, **kw)
    a, b = onnx.load(str(blocked)), onnx.load(str(whole))
    assert [str(n) for n in a.graph.node] == [str(n) for n in b.graph.node]
    init_a = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    init_b = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert init_a.keys() == init_b.keys()
    for name in init_a:
        assert init_a[name].dtype == init_b[name].dtype
        np.testing.assert_array_equal(init_a[name], init_b[name], err_msg=name)
    if kw.get("nbits"):
        assert any(n.op_type == "MatMulNBits" for n in a.graph.node)
    x = {"x": np.random.default_rng(0).standard_normal((2, cols if kw["transposed"] else rows))
         .astype(np.float32)}
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, x)[0]
           for p in (blocked, whole)]
    np.testing.assert_array_equal(run[0], run[1])


# --- peak memory ---------------------------------------------------------------------------
MEM_ROWS, MEM_COLS, MEM_BLOCK_ROWS = 32768, 2048, 1024  # 268 MB fp32 source, 8.4 MB blocks


def _peak_rss_growth(mode: str, what: str, rows: int, dest: Path) -> int:
    """Run in a child process: the growth of its peak RSS (bytes) while writing the weight."""
    out = subprocess.run([sys.executable, "-m", "tests.scale.test_row_blocks", mode, what,
                          str(rows), str(dest)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    return int(json.loads(out.stdout.strip().splitlines()[-1])["growth"])


@pytest.mark.slow  # six child processes writing 1.9 GB in all: ~45 s of CPU
@pytest.mark.skipif(not rss.AVAILABLE, reason="reads /proc (Linux)")
@pytest.mark.parametrize("what", ["int8", "fp32"])
def test_row_blocks_bound_peak_memory(what: str, tmp_path: Path) -> None:
    """Blocked, the peak does not grow with the weight: doubling it adds only what must be held
    (the int8 head's fp32 scales, one per 32 weights) plus 16 MiB for allocator noise. Read
    whole, the same child's peak grows by more than the weight (the measurement can see it)."""
    weight = MEM_ROWS * MEM_COLS * 4
    held = weight // 32 if what == "int8" else 0
    one = _peak_rss_growth("blocks", what, MEM_ROWS, tmp_path / "b1" / "g.onnx")
    two = _peak_rss_growth("blocks", what, 2 * MEM_ROWS, tmp_path / "b2" / "g.onnx")
    whole = _peak_rss_growth("whole", what, MEM_ROWS, tmp_path / "w" / "g.onnx")
    print(f"{what}: peak RSS growth, blocks of {MEM_BLOCK_ROWS * MEM_COLS * 4 / 1e6:.1f} MB: "
          f"{one / 1e6:.0f} MB for a {weight / 1e6:.0f} MB weight, {two / 1e6:.0f} MB for "
          f"twice that; read whole: {whole / 1e6:.0f} MB")
    assert whole > weight, "the measurement does not see the whole weight"
    assert two - one < held + 16 * 2**20
    assert one < weight / 2


def _child(mode: str, what: str, rows: str, dest: str) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (  # noqa: F401 (imported now,
        MatMulNBitsQuantizer,  # not inside the measured span)
    )

    nbits = NBits(4, 32, 8, vocab_rows=int(rows)) if what == "int8" else None
    path = Path(dest)
    # warm up every code path on a small weight first (lazy imports, allocator arenas)
    write(path.with_name("warm.onnx"), 512, MEM_COLS, True, 128 if mode == "blocks" else None,
          nbits=nbits)
    before = current_rss()  # (not the peak so far: growth above the current size counts)
    write(path, int(rows), MEM_COLS, True, MEM_BLOCK_ROWS if mode == "blocks" else None,
          nbits=nbits)
    after = peak_rss()
    print(json.dumps({"growth": after - before}))


if __name__ == "__main__":
    _child(*sys.argv[1:])
