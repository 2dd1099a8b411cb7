"""The files an ONNX graph makes ONNX Runtime open: the `location` of every tensor stored as
external data. Torch-free and onnx-free: a small protobuf reader over a memory map.

ONNX Runtime resolves these locations itself, so the runtime reads them first and refuses a
graph whose external data is not a listed file of the artifact (containment.py). Tensors sit in
graph initializers, sparse initializers, Constant-style node attributes (also in subgraphs) and
function bodies; all are walked. Raw weight bytes are skipped by length, never read.
"""

from __future__ import annotations

import mmap
import os

from molmo_runtime.errors import ArtifactError

# message -> {field number: message it holds}; field numbers from onnx.proto3
_MODEL, _GRAPH, _NODE, _ATTR, _FUNC, _SPARSE, _TENSOR, _ENTRY = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 25: _FUNC},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNC: {7: _NODE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},
}
_MAX_DEPTH = 64


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> list[tuple[int, int, int]]:
    """(field, start, end) of every length-delimited field of the message in buf[start:end]."""
    out = []
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed("field runs past its message")
            out.append((field, pos, pos + size))
            pos += size
        else:
            raise _Malformed(f"wire type {wire}")
        if pos > end:
            raise _Malformed("field runs past its message")
    return out


def external_data_locations(path: str | os.PathLike[str]) -> set[str]:
    """Every external-data `location` string in the ONNX file at `path` (as written)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ArtifactError(f"{path}: empty ONNX file; re-export the artifact")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return _walk(buf, size)
            except (_Malformed, UnicodeDecodeError) as e:
                raise ArtifactError(f"{path}: not a readable ONNX model ({e}); re-export the "
                                    "artifact") from e
            finally:
                buf.release()


def _walk(buf: memoryview, size: int) -> set[str]:
    found: set[str] = set()
    stack = [(_MODEL, 0, size, 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _Malformed("nesting too deep")
        fields = _fields(buf, start, end)
        if kind == _ENTRY:
            keys = {bytes(buf[s:e]).decode("utf-8") for f, s, e in fields if f == 1}
            if "location" in keys:
                found.update(bytes(buf[s:e]).decode("utf-8") for f, s, e in fields if f == 2)
            continue
        children = _CHILDREN[kind]
        stack.extend((children[f], s, e, depth + 1) for f, s, e in fields if f in children)
    return found
