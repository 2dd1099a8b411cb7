"""A small artifact that passes every manifest check, without torch: tiny ONNX graphs (the
decoder's weight as external data), a word-level tokenizer with Molmo's special tokens, a
processor.json and an embedding table. Its graphs do not compute Molmo; they exist so that
tests of the trust model (containment, listing, hashing, ownership) run in milliseconds."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from molmo_runtime.fileio import write_json_atomic
from molmo_runtime.graph_io import GraphDims, all_graph_specs
from molmo_runtime.manifest import file_record, write_manifest
from molmo_runtime.processing import IMAGE_SPECIAL_TOKENS

EOS = "<|endoftext|>"
DIMS = GraphDims(patches_per_crop=4, patch_dim=3, vision_feature_dim=2, tokens_per_crop=1,
                 d_model=4, num_layers=1, num_kv_heads=1, head_dim=4, vocab_rows=16,
                 max_crops=2, max_seq_len=32)


def _graph(path: Path, external: bool) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from molmo_calibration.graph_tools import save_model

    size = 512  # 2 KB: above save_model's threshold for moving a tensor to external data
    weight = numpy_helper.from_array(np.arange(size, dtype=np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])],
                              [weight])
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path,
               external)


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "the", "cat"]
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([*IMAGE_SPECIAL_TOKENS, EOS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    write_json_atomic(folder / "tokenizer_config.json", {"eos_token": EOS})


def fake_manifest(out: Path, version: int = 1) -> dict[str, Any]:
    """Write the files of version `version` into `out`; return the manifest without `files`.
    Versions differ in embed_tokens.npy and in one file of their own, extra/v<version>.bin."""
    from molmo_runtime.image_processing import MolmoImageProcessor

    specs = all_graph_specs(DIMS)
    for name, spec in specs.items():
        _graph(out / spec.file, external=(name == "decoder"))
    np.save(out / "embed_tokens.npy",
            np.full((DIMS.vocab_rows, DIMS.d_model), version, np.float32))
    (out / "extra").mkdir(exist_ok=True)
    (out / "extra" / f"v{version}.bin").write_bytes(bytes([version]) * 64)
    MolmoImageProcessor(max_crops=DIMS.max_crops).save_to_artifact(out)
    _tokenizer(out / "tokenizer")
    graphs = {name: spec.to_dict() for name, spec in specs.items()}
    graphs["decoder"]["external_data"] = ["onnx/decoder.onnx.data"]
    return {"exporter_version": "test", "target": "onnx", "model": {"name": "fake", "config": {}},
            "dims": DIMS.to_dict(), "graphs": graphs, "max_crops": DIMS.max_crops,
            "max_seq_len": DIMS.max_seq_len, "has_tokenizer": True,
            "special_tokens": {"eos": len(IMAGE_SPECIAL_TOKENS) + 5},
            "verification": {"passed": True, "summary": "fake"}, "fake_version": version}


def make_fake_artifact(out: Path, version: int = 1) -> Path:
    """Write the complete artifact (files + manifest) into `out` and return `out`."""
    raw = fake_manifest(out, version)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    write_manifest(out, {**raw, "files": {rel: file_record(out, rel) for rel in files}})
    return out


# --- which files Python opens ------------------------------------------------------------------

_OPENED: list[str] = []
_RECORDING = [False]
_HOOKED = [False]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


@contextlib.contextmanager
def record_opens() -> Iterator[list[str]]:
    """Yield a list that collects the real path of every file Python opens (audit event
    "open": open(), os.open, np.load, mmap'ed files...) until the block ends. Files opened by
    native libraries without Python (the tokenizers crate, ONNX Runtime) are not seen."""
    if not _HOOKED[0]:
        sys.addaudithook(_audit)  # cannot be removed; records only inside this block
        _HOOKED[0] = True
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        yield _OPENED
    finally:
        _RECORDING[0] = False
