"""Checkpoint loading: the name table, sharded files, the load report, and one clear error per
kind of bad folder (each naming the file and what to do)."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from molmo_export import MolmoForConditionalGeneration, get_preset
from molmo_export.checkpoint import build_plan, scan_checkpoint
from molmo_export.config import CheckpointError, config_from_checkpoint
from tests.conftest import golden_path


def copy_golden(name: str, dst: Path, weights: bool = True) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "full_config.json") + (("model.safetensors",) if weights else ()):
        if golden_path(name, f).exists():
            shutil.copy(golden_path(name, f), dst / f)
    return dst


def shard(src: Path, dst: Path, n: int) -> Path:
    """Rewrite src's model.safetensors as n hub-style shards + model.safetensors.index.json."""
    tensors = load_file(str(src / "model.safetensors"))
    copy_golden_cfg(src, dst)
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n]}
        save_file(part, str(dst / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return dst


def copy_golden_cfg(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "full_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)


def state(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- the name table ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["molmo-7b-d-0924", "molmo-7b-o-0924", "molmoe-1b-0924",
                                  "molmo-72b-0924", "demo", "demo-random",
                                  "bench-0.5b"])
def test_table_covers_every_parameter_of_every_preset(name: str) -> None:
    cfg = get_preset(name)
    with torch.device("meta"):
        model = MolmoForConditionalGeneration(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    plan, uncovered = build_plan(cfg, shapes)
    assert not uncovered
    # The official tensors hold exactly as many numbers as our parameters (no overlap, no gap).
    official = sum(int(torch.Size(e.shape).numel()) for e in plan.values())
    assert official == sum(p.numel() for p in model.parameters())


def test_7b_d_official_shapes_are_the_spec_table() -> None:
    """Spec §9.2 (7B-D): fused shapes as the hub checkpoint stores them."""
    cfg = get_preset("molmo-7b-d-0924")
    with torch.device("meta"):
        model = MolmoForConditionalGeneration(cfg)
    plan, _ = build_plan(cfg, {n: tuple(p.shape) for n, p in model.named_parameters()})
    expect = {
        "model.transformer.wte.embedding": (152064, 3584),
        "model.transformer.wte.new_embedding": (128, 3584),
        "model.transformer.blocks.27.att_proj.weight": (4608, 3584),
        "model.transformer.blocks.0.att_proj.bias": (4608,),
        "model.transformer.blocks.0.ff_proj.weight": (37888, 3584),
        "model.transformer.blocks.0.ff_out.weight": (3584, 18944),
        "model.transformer.ff_out.weight": (152064, 3584),
        "model.vision_backbone.image_vit.patch_embedding.weight": (1024, 588),
        "model.vision_backbone.image_vit.positional_embedding": (577, 1024),
        "model.vision_backbone.image_vit.transformer.resblocks.22.feed_forward.w1.weight":
            (4096, 1024),
        "model.vision_backbone.pad_embed": (2, 2048),
        "model.vision_backbone.image_pooling_2d.wq.weight": (1024, 2048),
        "model.vision_backbone.image_projector.w1.weight": (18944, 1024),
        "model.vision_backbone.image_projector.w2.weight": (3584, 18944),
    }
    for key, shape in expect.items():
        assert plan[key].shape == shape, key
    # ViT: 5 + 23 blocks x 16, connector: 1 + 8 + 3; LLM: wte 2, ln_f, 28 x 7, head.
    assert len(plan) == 5 + 23 * 16 + 1 + 8 + 3 + 2 + 1 + 28 * 7 + 1


def test_fused_tensors_are_split_as_the_spec_says(tmp_path: Path) -> None:
    """att_proj rows = [q; k; v], ff_proj rows = [up; gate] (spec §4), embeddings concatenated."""
    model = MolmoForConditionalGeneration.from_pretrained(golden_path("model"))
    raw = load_file(str(golden_path("model", "model.safetensors")))
    layer = model.language_model.model.layers[1]
    att = raw["model.transformer.blocks.1.att_proj.weight"]  # [64 q + 32 k + 32 v, 64]
    assert torch.equal(layer.attn.wq.weight, att[:64])
    assert torch.equal(layer.attn.wk.weight, att[64:96])
    assert torch.equal(layer.attn.wv.weight, att[96:])
    assert torch.equal(layer.attn.wv.bias, raw["model.transformer.blocks.1.att_proj.bias"][96:])
    ff = raw["model.transformer.blocks.1.ff_proj.weight"]  # [96 up + 96 gate, 64]
    assert torch.equal(layer.mlp.up.weight, ff[:96])
    assert torch.equal(layer.mlp.gate.weight, ff[96:])
    table = model.language_model.model.embed_tokens.weight
    assert torch.equal(table[:1024], raw["model.transformer.wte.embedding"])
    assert torch.equal(table[1024:], raw["model.transformer.wte.new_embedding"])
    proj = model.connector.projector
    assert torch.equal(proj.gate.weight, raw["model.vision_backbone.image_projector.w1.weight"])
    assert torch.equal(proj.up.weight, raw["model.vision_backbone.image_projector.w3.weight"])


def test_moe_experts_are_stacked_in_order() -> None:
    model = MolmoForConditionalGeneration.from_pretrained(golden_path("model_moe"))
    raw = load_file(str(golden_path("model_moe", "model.safetensors")))
    mlp = model.language_model.model.layers[1].mlp
    for e in (0, 17, 63):
        prefix = f"model.transformer.blocks.1.mlp.experts.{e}."
        assert torch.equal(mlp.gate_proj[e], raw[prefix + "gate_proj.weight"])
        assert torch.equal(mlp.up_proj[e], raw[prefix + "up_proj.weight"])
        assert torch.equal(mlp.down_proj[e], raw[prefix + "down_proj.weight"])
    assert torch.equal(model.language_model.lm_head.weight, raw["lm_head.weight"])


# -- loading ------------------------------------------------------------------------------------

def test_report_is_clean_for_golden_checkpoints() -> None:
    for name in ("model", "model_7b_o", "model_moe"):
        report = MolmoForConditionalGeneration.from_pretrained(golden_path(name)).load_report
        assert report.ok and not report.unused, report.summary()


def test_sharded_checkpoint_loads_identically(tmp_path: Path) -> None:
    single = MolmoForConditionalGeneration.from_pretrained(golden_path("model"))
    sharded_dir = shard(golden_path("model"), tmp_path / "sharded", 3)
    sharded = MolmoForConditionalGeneration.from_pretrained(sharded_dir)
    assert sorted(sharded.load_report.files) == [f"model-0000{i}-of-00003.safetensors"
                                                 for i in (1, 2, 3)]
    a, b = state(single), state(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_argument_casts_on_load() -> None:
    model = MolmoForConditionalGeneration.from_pretrained(golden_path("model"),
                                                          dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[643, 17, 18]])
    assert model(ids).logits.dtype == torch.bfloat16


def test_loader_holds_one_tensor_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights are copied tensor by tensor into the (meta-built, then allocated) model: no
    second full copy (a state dict) is ever built."""
    import molmo_export.checkpoint as ckpt

    alive: list[weakref.ref[Any]] = []
    most = 0
    real_open = ckpt._open

    class Tracking:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Tracking:
            self.f.__enter__()
            return self

        def __exit__(self, *a: object) -> None:
            self.f.__exit__(*a)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def get_tensor(self, name: str) -> Any:
            nonlocal most
            t = self.f.get_tensor(name)
            alive.append(weakref.ref(t))
            most = max(most, sum(r() is not None for r in alive))
            return t

    monkeypatch.setattr(ckpt, "_open", lambda path: Tracking(real_open(path)))
    model = MolmoForConditionalGeneration.from_pretrained(golden_path("model"))
    assert len(alive) == 83 and most == 1
    assert model.load_report.ok


def test_unused_tensor_is_reported_and_warned(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck", weights=False)
    tensors = load_file(str(golden_path("model", "model.safetensors")))
    tensors["model.transformer.blocks.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.warns(UserWarning, match="unused 1 tensor"):
        model = MolmoForConditionalGeneration.from_pretrained(d)
    assert model.load_report.unused == ["model.transformer.blocks.0.extra.weight"]


# -- bad input: one clear error each ------------------------------------------------------------

def test_missing_tensor_refuses(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck", weights=False)
    tensors = load_file(str(golden_path("model", "model.safetensors")))
    del tensors["model.transformer.blocks.1.ff_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): "
                       r"model\.transformer\.blocks\.1\.ff_proj\.weight"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_mis_shaped_tensor_refuses(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck", weights=False)
    tensors = load_file(str(golden_path("model", "model.safetensors")))
    tensors["model.transformer.blocks.0.att_proj.weight"] = torch.zeros(192, 64)  # MHA-sized
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mis-shaped 1 tensor.*att_proj\.weight "
                       r"\[192, 64\] \(expected \[128, 64\]\)"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_config_of_another_model_refuses(tmp_path: Path) -> None:
    """7B-O's config with 7B-D's weights: reported, not loaded into the wrong structure."""
    d = copy_golden("model", tmp_path / "ck")
    shutil.copy(golden_path("model_7b_o", "config.json"), d / "config.json")
    with pytest.raises(CheckpointError) as e:
        MolmoForConditionalGeneration.from_pretrained(d)
    msg = str(e.value)
    assert "q_norm.weight" in msg and "att_proj.weight" in msg and "config.json" in msg


def test_folder_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        MolmoForConditionalGeneration.from_pretrained(tmp_path / "nope")


def test_folder_without_config(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copy(golden_path("model", "model.safetensors"), d)
    with pytest.raises(CheckpointError, match=r"config\.json not found.*download"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_folder_without_weights(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck", weights=False)
    with pytest.raises(CheckpointError, match=r"no weights in .*model\.safetensors.*download"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_unknown_architecture(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture .*llama"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_unsupported_setting(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_norm_type"] = "default"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported setting layer_norm_type='default'"):
        config_from_checkpoint(d)


def test_invalid_json_config(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck")
    (d / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        config_from_checkpoint(d)


def test_truncated_safetensors(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors "
                       r"file.*truncated or corrupt.*download it again"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    d = copy_golden("model", tmp_path / "ck")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # garbage in the JSON header
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    d = shard(golden_path("model"), tmp_path / "ck", 3)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json names the shard "
                       r"model-00002-of-00003\.safetensors, which is not in .*download the "
                       "missing shard"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_invalid_index(tmp_path: Path) -> None:
    d = shard(golden_path("model"), tmp_path / "ck", 2)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"index\.json is not a valid safetensors index"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_pickle_only_checkpoint_is_refused_without_unpickling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = copy_golden("model_moe", tmp_path / "ck", weights=False)
    (d / "pytorch_model.bin").write_bytes(b"not even read")

    def never(*a: Any, **k: Any) -> None:
        raise AssertionError("the loader must never unpickle")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(CheckpointError, match=r"only pytorch_model\.bin .*never unpickles.*"
                       r"safetensors"):
        MolmoForConditionalGeneration.from_pretrained(d)


def test_scan_reads_headers_only(tmp_path: Path) -> None:
    """Names and shapes are checked before any tensor data is read (a mis-shaped 7B checkpoint
    is refused in a second, not after loading 30 GB)."""
    cfg = config_from_checkpoint(golden_path("model"))
    with torch.device("meta"):
        model = MolmoForConditionalGeneration(cfg)
    report, location, plan = scan_checkpoint(
        golden_path("model"), cfg, {n: tuple(p.shape) for n, p in model.named_parameters()})
    assert report.ok and len(plan) == 83 and set(location) == set(plan)
    with safe_open(str(golden_path("model", "model.safetensors")), "pt") as f:
        assert set(f.keys()) == set(plan)
