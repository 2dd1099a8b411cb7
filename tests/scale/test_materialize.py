"""The materialiser writes the hub layout (bf16 shards + index) that from_pretrained reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from molmo_export.materialize import materialize  # noqa: E402
from molmo_export.model import MolmoForConditionalGeneration  # noqa: E402
from molmo_runtime.errors import InputError  # noqa: E402


def test_sharded_bf16_checkpoint_loads_through_from_pretrained(tmp_path: Path) -> None:
    out = materialize("demo", tmp_path / "demo-bf16", dtype="bf16", shard_gb=0.0003)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).is_file()
    model = MolmoForConditionalGeneration.from_pretrained(out)
    assert model.load_report.ok and not model.load_report.unused
    # the same draws as a float32 materialisation, rounded to bf16
    reference = MolmoForConditionalGeneration.from_pretrained(
        materialize("demo", tmp_path / "demo-fp32", dtype="fp32"))
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(ours[name], p.to(torch.bfloat16).float()), name


def test_refuses_a_folder_with_files(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="not an empty folder"):
        materialize("demo", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
