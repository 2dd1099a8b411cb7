"""Loading official Molmo checkpoints: one declarative name table, safetensors only.

    official name (hub state_dict)                   ours (MolmoForConditionalGeneration)
    model.transformer.blocks.{n}.att_proj.weight ->  language_model.model.layers.{n}.attn.w{q,k,v}
    ...                                                  (fused tensors split along dim 0)

`load_pretrained` reads an official hub folder as downloaded (config.json + model.safetensors,
or model-0000N-of-0000M.safetensors + model.safetensors.index.json), checks every tensor's
name and shape against the table before reading any data, reports missing / unused /
mis-shaped tensors and refuses to load when any is missing or mis-shaped. The model is built on
the meta device and then filled tensor by tensor from memory-mapped files, so only one copy of
the weights (plus one tensor in flight) is ever held. Nothing is loaded through pickle: a folder
with only pytorch_model.bin is refused with instructions to convert it.

Importing this module does not import torch (the name table and the file checks are torch-free).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molmo_export.config import (
    BUILTIN_PRESETS,
    CheckpointError,
    MolmoConfig,
    config_from_checkpoint,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# The name table
# ---------------------------------------------------------------------------------------------
# Placeholders: {n} decoder layer, {v} ViT block, {e} MoE expert. A target that the model being
# loaded does not have (e.g. att_proj.bias without qkv_bias) makes its official tensor "unused".


@dataclass(frozen=True)
class Split:
    """A fused official tensor cut along dim 0 into several of ours, in this order."""

    targets: tuple[str, ...]
    rule: str  # "qkv": [q (H*hd); k (n_kv*hd); v (n_kv*hd)]   "up_gate": [up (I/2); gate (I/2)]


@dataclass(frozen=True)
class Into:
    """An official tensor that fills a part of one of ours."""

    target: str
    part: str  # "embed_base": rows [0, E)   "embed_new": rows [E, E+128)   "expert": index [e]


Target = str | Split | Into

_VIT = "model.vision_backbone.image_vit."
_BLOCK = _VIT + "transformer.resblocks.{v}."
_POOL = "model.vision_backbone.image_pooling_2d."
_PROJ = "model.vision_backbone.image_projector."
_OURS_VB = "vision.blocks.{v}."
_TX = "model.transformer."
_OURS_L = "language_model.model.layers.{n}."

VISION_TABLE: tuple[tuple[str, Target], ...] = (
    (_VIT + "patch_embedding.weight", "vision.patch_embed.weight"),
    (_VIT + "class_embedding", "vision.class_embedding"),
    (_VIT + "positional_embedding", "vision.positional_embedding"),
    (_VIT + "pre_ln.weight", "vision.pre_ln.weight"),
    (_VIT + "pre_ln.bias", "vision.pre_ln.bias"),
    *((_BLOCK + f"attention.w{x}.{p}", _OURS_VB + f"attn.w{x}.{p}")
      for x in "qkvo" for p in ("weight", "bias")),
    *((_BLOCK + f"attention_norm.{p}", _OURS_VB + f"attn_norm.{p}") for p in ("weight", "bias")),
    *((_BLOCK + f"ffn_norm.{p}", _OURS_VB + f"mlp_norm.{p}") for p in ("weight", "bias")),
    *((_BLOCK + f"feed_forward.w{i}.{p}", _OURS_VB + f"mlp.fc{i}.{p}")
      for i in (1, 2) for p in ("weight", "bias")),
    ("model.vision_backbone.pad_embed", "connector.pad_embed"),
    *((_POOL + f"w{x}.{p}", f"connector.pool.w{x}.{p}")
      for x in "qkvo" for p in ("weight", "bias")),
    (_PROJ + "w1.weight", "connector.projector.gate.weight"),
    (_PROJ + "w3.weight", "connector.projector.up.weight"),
    (_PROJ + "w2.weight", "connector.projector.down.weight"),
)

_TEXT_COMMON: tuple[tuple[str, Target], ...] = (
    (_TX + "wte.embedding", Into("language_model.model.embed_tokens.weight", "embed_base")),
    (_TX + "wte.new_embedding", Into("language_model.model.embed_tokens.weight", "embed_new")),
    (_TX + "ln_f.weight", "language_model.model.norm.weight"),
)
_QKV = Split((_OURS_L + "attn.wq.{p}", _OURS_L + "attn.wk.{p}", _OURS_L + "attn.wv.{p}"), "qkv")

# 7B-D, 7B-O, 72B (official modeling_molmo.py).
DENSE_TEXT_TABLE: tuple[tuple[str, Target], ...] = (
    *_TEXT_COMMON,
    (_TX + "blocks.{n}.att_proj.weight", _QKV),
    (_TX + "blocks.{n}.att_proj.bias", _QKV),
    (_TX + "blocks.{n}.attn_out.weight", _OURS_L + "attn.wo.weight"),
    (_TX + "blocks.{n}.q_norm.weight", _OURS_L + "attn.q_norm.weight"),
    (_TX + "blocks.{n}.k_norm.weight", _OURS_L + "attn.k_norm.weight"),
    (_TX + "blocks.{n}.attn_norm.weight", _OURS_L + "attn_norm.weight"),
    (_TX + "blocks.{n}.ff_norm.weight", _OURS_L + "mlp_norm.weight"),
    (_TX + "blocks.{n}.ff_proj.weight",
     Split((_OURS_L + "mlp.up.weight", _OURS_L + "mlp.gate.weight"), "up_gate")),
    (_TX + "blocks.{n}.ff_out.weight", _OURS_L + "mlp.down.weight"),
    (_TX + "ff_out.weight", "language_model.lm_head.weight"),
)

# MolmoE-1B (official modeling_molmoe.py; golden README §8.3): nested attn./mlp. modules,
# separate expert matrices, the LM head at the top level.
MOE_TEXT_TABLE: tuple[tuple[str, Target], ...] = (
    *_TEXT_COMMON,
    (_TX + "blocks.{n}.attn.att_proj.weight", _QKV),
    (_TX + "blocks.{n}.attn.attn_out.weight", _OURS_L + "attn.wo.weight"),
    (_TX + "blocks.{n}.attn.q_norm.weight", _OURS_L + "attn.q_norm.weight"),
    (_TX + "blocks.{n}.attn.k_norm.weight", _OURS_L + "attn.k_norm.weight"),
    (_TX + "blocks.{n}.attn.attn_norm.weight", _OURS_L + "attn_norm.weight"),
    (_TX + "blocks.{n}.mlp.ff_norm.weight", _OURS_L + "mlp_norm.weight"),
    (_TX + "blocks.{n}.mlp.gate.weight", _OURS_L + "mlp.router.weight"),
    *((_TX + f"blocks.{{n}}.mlp.experts.{{e}}.{w}_proj.weight", Into(_OURS_L + f"mlp.{w}_proj",
                                                                      "expert"))
      for w in ("gate", "up", "down")),
    ("lm_head.weight", "language_model.lm_head.weight"),
)


def name_table(cfg: MolmoConfig) -> tuple[tuple[str, Target], ...]:
    return VISION_TABLE + (MOE_TEXT_TABLE if cfg.text.is_moe else DENSE_TEXT_TABLE)


# ---------------------------------------------------------------------------------------------
# Expanding the table into a plan: official name -> writes into our parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    param: str  # our parameter name
    index: tuple[int, int] | int | None  # rows [a, b) or one index along dim 0 (None = whole)
    src_rows: tuple[int, int] | None  # rows of the official tensor (None = all)


@dataclass(frozen=True)
class PlanEntry:
    official: str
    shape: tuple[int, ...]  # expected shape of the official tensor
    writes: tuple[Write, ...]


def _split_sizes(cfg: MolmoConfig, rule: str) -> tuple[int, ...]:
    t = cfg.text
    if rule == "qkv":
        return (t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.num_kv_heads * t.head_dim)
    if rule == "up_gate":
        return (t.mlp_hidden_size, t.mlp_hidden_size)
    raise ValueError(rule)


def _expansions(template: str, cfg: MolmoConfig) -> Iterator[dict[str, int]]:
    layers = range(cfg.text.num_layers) if "{n}" in template else [0]
    blocks = range(cfg.vision.num_layers) if "{v}" in template else [0]
    experts = range(cfg.text.moe_num_experts) if "{e}" in template else [0]
    for n in layers:
        for v in blocks:
            for e in experts:
                yield {"n": n, "v": v, "e": e}


def build_plan(cfg: MolmoConfig, param_shapes: dict[str, tuple[int, ...]]
               ) -> tuple[dict[str, PlanEntry], set[str]]:
    """-> (plan by official name, our parameters no table entry covers)."""
    plan: dict[str, PlanEntry] = {}
    covered: set[str] = set()
    for template, target in name_table(cfg):
        suffix = template.rsplit(".", 1)[-1]  # "weight" / "bias" for split targets
        for sub in _expansions(template, cfg):
            official = template.format(**sub)
            entry = _plan_entry(cfg, official, target, sub, suffix, param_shapes)
            if entry is not None:
                plan[official] = entry
                covered.update(w.param for w in entry.writes)
    return plan, set(param_shapes) - covered


def _plan_entry(cfg: MolmoConfig, official: str, target: Target, sub: dict[str, int],
                suffix: str, shapes: dict[str, tuple[int, ...]]) -> PlanEntry | None:
    if isinstance(target, str):
        name = target.format(**sub)
        return PlanEntry(official, shapes[name], (Write(name, None, None),)) if name in shapes \
            else None
    if isinstance(target, Split):
        names = [t.format(p=suffix, **sub) for t in target.targets]
        if not all(n in shapes for n in names):
            return None
        sizes = _split_sizes(cfg, target.rule)
        writes, start = [], 0
        for name, size in zip(names, sizes):
            writes.append(Write(name, None, (start, start + size)))
            start += size
        return PlanEntry(official, (start, *shapes[names[0]][1:]), tuple(writes))
    name = target.target.format(**sub)
    if name not in shapes:
        return None
    shape = shapes[name]
    if target.part == "expert":
        return PlanEntry(official, shape[1:], (Write(name, sub["e"], None),))
    base = cfg.text.embedding_size
    rows = (0, base) if target.part == "embed_base" else (base, shape[0])
    return PlanEntry(official, (rows[1] - rows[0], *shape[1:]), (Write(name, rows, None),))


# ---------------------------------------------------------------------------------------------
# Finding and checking the files (torch-free)
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What the checkpoint holds compared with what the model needs."""

    directory: str
    files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # needed official tensors not found
    unused: list[str] = field(default_factory=list)  # tensors in the files nothing reads
    mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list)  # (name, in file, expected)
    uncovered: list[str] = field(default_factory=list)  # our parameters no table entry fills

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mis_shaped or self.uncovered)

    def summary(self, limit: int = 10) -> str:
        def some(items: list[Any]) -> str:
            shown = ", ".join(str(i) for i in items[:limit])
            return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

        lines = []
        if self.missing:
            lines.append(f"missing {len(self.missing)} tensor(s): {some(self.missing)}")
        if self.mis_shaped:
            lines.append(f"mis-shaped {len(self.mis_shaped)} tensor(s): " + some(
                [f"{n} {list(got)} (expected {list(exp)})" for n, got, exp in self.mis_shaped]))
        if self.uncovered:
            lines.append(f"no checkpoint tensor maps to {len(self.uncovered)} model "
                         f"parameter(s): {some(self.uncovered)}")
        if self.unused:
            lines.append(f"unused {len(self.unused)} tensor(s): {some(self.unused)}")
        return "\n".join(lines) or "all tensors present with the expected shapes"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, with clear errors for every bad layout."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); "
                                  "re-download it from the model repository") from None
        for shard in shards:
            if not (directory / shard).is_file():
                raise CheckpointError(
                    f"{index} names the shard {shard}, which is not in {directory}; the download "
                    "is incomplete: download the missing shard (all "
                    f"{len(shards)} shards are needed)")
        return [directory / s for s in shards]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in directory.iterdir()
                     if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{directory} holds only {', '.join(pickles)} (PyTorch pickle format). This loader "
            "never unpickles files (pickle can run arbitrary code). Convert it to safetensors "
            "once, in an environment you trust, e.g.: python -c \"import torch; from "
            "safetensors.torch import save_file; save_file(torch.load('pytorch_model.bin', "
            "weights_only=True), 'model.safetensors')\" (run inside the folder), or download a "
            "revision of the checkpoint that ships *.safetensors")
    raise CheckpointError(f"no weights in {directory}: expected {SINGLE_FILE}, or sharded "
                          f"model-0000N-of-0000M.safetensors with {INDEX_FILE}; download the "
                          "weight files of the checkpoint into this folder")


def _open(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is truncated "
                              "or corrupt: delete it and download it again") from None


def scan_checkpoint(directory: Path, cfg: MolmoConfig, param_shapes: dict[str, tuple[int, ...]]
                    ) -> tuple[LoadReport, dict[str, Path], dict[str, PlanEntry]]:
    """Compare the files' tensor names and shapes with the plan, reading headers only."""
    files = weight_files(directory)
    report = LoadReport(str(directory), [f.name for f in files])
    location: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with _open(path) as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
                location[key] = path
    plan, uncovered = build_plan(cfg, param_shapes)
    report.uncovered = sorted(uncovered)
    for name, entry in plan.items():
        if name not in shapes:
            report.missing.append(name)
        elif shapes[name] != entry.shape:
            report.mis_shaped.append((name, shapes[name], entry.shape))
    report.unused = sorted(set(shapes) - set(plan))
    return report, location, plan


# ---------------------------------------------------------------------------------------------
# Loading (torch)
# ---------------------------------------------------------------------------------------------


def _fill(params: dict[str, nn.Parameter], entry: PlanEntry, tensor: torch.Tensor) -> None:
    for w in entry.writes:
        src = tensor if w.src_rows is None else tensor[w.src_rows[0]:w.src_rows[1]]
        dst = params[w.param].data
        if isinstance(w.index, tuple):
            dst = dst[w.index[0]:w.index[1]]
        elif isinstance(w.index, int):
            dst = dst[w.index]
        dst.copy_(src)  # casts to the model dtype


def load_pretrained(cls: type, directory: str | os.PathLike[str], dtype: Any = None) -> Any:
    """Build `cls(config)` from an official checkpoint folder; see the module docstring."""
    import torch
    from safetensors import SafetensorError

    dtype = dtype or torch.float32
    if not Path(directory).exists() and str(directory) in BUILTIN_PRESETS:
        from molmo_export.demo import materialize_preset

        directory = materialize_preset(str(directory))
    directory = Path(directory)
    cfg = config_from_checkpoint(directory)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype)
    param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    report, location, plan = scan_checkpoint(directory, cfg, param_shapes)
    if not report.ok:
        raise CheckpointError(f"cannot load {directory}: the tensors do not match a "
                              f"{cfg.name} model built from its config.json\n{report.summary()}\n"
                              "Check that config.json belongs to these weights, or download "
                              "the complete checkpoint again")
    if report.unused:
        warnings.warn(f"{directory}: {report.summary()}", stacklevel=2)
    model = model.to_empty(device="cpu")
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(location[name], []).append(name)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path, names in by_file.items():
            with _open(path) as f:
                for name in names:
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"{path}: cannot read tensor {name} ({e}); the "
                                              "file is corrupt: download it again") from None
                    _fill(params, plan[name], tensor)
                    del tensor  # one tensor in flight at a time
    model.requires_grad_(False)
    model.eval()
    model.load_report = report
    return model


def official_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under their OFFICIAL names (the inverse of loading: fused tensors
    re-assembled from their parts), contiguous float32 copies, ready for safetensors."""
    import torch

    params = dict(model.named_parameters())
    plan, _ = build_plan(model.config, {n: tuple(p.shape) for n, p in params.items()})
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for official, entry in sorted(plan.items()):
            parts = []
            for w in entry.writes:
                src = params[w.param].detach()
                if isinstance(w.index, tuple):
                    src = src[w.index[0]:w.index[1]]
                elif isinstance(w.index, int):
                    src = src[w.index]
                parts.append(src)
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(tensor.shape) != entry.shape:
                raise AssertionError(f"{official}: assembled {tuple(tensor.shape)}, "
                                     f"expected {entry.shape}")
            out[official] = tensor.to(torch.float32).contiguous().clone()
    return out
