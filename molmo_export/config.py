"""Molmo configuration: frozen dataclasses and named presets.

Torch-free on purpose: the engine builder, the manifest writer and the tests read configs on
machines without PyTorch. Numbers come from ../shared/docs/molmo_architecture.md §1-§4.

    MolmoConfig
      ├─ vision:  MolmoVisionConfig   CLIP ViT-L/14-336 truncated to 23 blocks (all 0924 models)
      ├─ pooling: MolmoPoolingConfig  pad embeddings, 2x2 attention-meanq pooling, SwiGLU projector
      ├─ text:    MolmoTextConfig     Qwen2 (7B-D, 72B) / OLMo post-norm (7B-O) / OLMoE (MolmoE)
      └─ tokens:  MolmoSpecialTokens  ids of BOS/EOS and the image special tokens
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from molmo_runtime.errors import MolmoError


@dataclass(frozen=True)
class MolmoVisionConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 4096
    num_layers: int = 23  # the released checkpoints hold resblocks 0..22 (CLIP-L has 24)
    layer_norm_eps: float = 1e-5
    vit_layers: tuple[int, ...] = (-2, -9)  # indices into the list of block outputs
    activation: str = "quick_gelu"

    @property
    def grid_size(self) -> int:  # 24
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # 576
        return self.grid_size**2

    @property
    def num_positions(self) -> int:  # 577 (class token + patches)
        return self.num_patches + 1

    @property
    def patch_dim(self) -> int:  # 588 = 14*14*3
        return self.patch_size * self.patch_size * 3

    @property
    def feature_dim(self) -> int:  # 2048: selected layers concatenated on channels
        return self.hidden_size * len(self.vit_layers)

    @property
    def selected_blocks(self) -> tuple[int, ...]:  # (21, 14) for 7B-D
        return tuple(i % self.num_layers for i in self.vit_layers)

    @property
    def blocks_to_run(self) -> int:  # blocks after the deepest selected one never matter
        return max(self.selected_blocks) + 1


@dataclass(frozen=True)
class MolmoPoolingConfig:
    """The connector: pad embeddings, 2x2 attention-meanq pooling, SwiGLU projector."""

    pool_h: int = 2
    pool_w: int = 2
    hidden_size: int = 1024  # pooling attention width (= ViT width)
    num_heads: int = 16
    head_dim: int = 64
    projector_hidden_size: int = 18944  # I/2 of the LLM's intermediate_size
    padding_embed: str = "pad_and_partial_pad"


@dataclass(frozen=True)
class MolmoTextConfig:
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 37888  # rows of the fused ff_proj (both SwiGLU halves)
    vocab_size: int = 152064
    embedding_size: int = 152064  # rows of the base embedding table and of the LM head
    additional_vocab_size: int = 128  # "new_embedding" rows appended to the table
    qkv_bias: bool = True
    qk_norm: bool = False  # "attention_layer_norm": RMSNorm over the full q and k widths
    norm_after: bool = False  # OLMo-2 style post-norm (7B-O)
    layer_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 4096
    moe_num_experts: int = 0  # 0 = dense SwiGLU MLP
    moe_top_k: int = 0

    @property
    def mlp_hidden_size(self) -> int:  # one SwiGLU half (per expert for MoE)
        return self.intermediate_size // 2

    @property
    def total_vocab_rows(self) -> int:  # embedding table incl. the extra rows
        return self.embedding_size + self.additional_vocab_size

    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0


@dataclass(frozen=True)
class MolmoSpecialTokens:
    bos: int = 151643  # the tokenizers have no BOS; the processor prepends EOS
    eos: int = 151643
    pad: int = 151643
    im_start: int = 152064
    im_end: int = 152065
    im_patch: int = 152066
    im_col: int = 152067
    image: int = 152068


@dataclass(frozen=True)
class MolmoConfig:
    name: str = "molmo-7b-d-0924"
    vision: MolmoVisionConfig = field(default_factory=MolmoVisionConfig)
    pooling: MolmoPoolingConfig = field(default_factory=MolmoPoolingConfig)
    text: MolmoTextConfig = field(default_factory=MolmoTextConfig)
    tokens: MolmoSpecialTokens = field(default_factory=MolmoSpecialTokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MolmoConfig:
        vision = dict(d.get("vision", {}))
        if "vit_layers" in vision:
            vision["vit_layers"] = tuple(vision["vit_layers"])
        return cls(
            name=d.get("name", "custom"),
            vision=MolmoVisionConfig(**vision),
            pooling=MolmoPoolingConfig(**d.get("pooling", {})),
            text=MolmoTextConfig(**d.get("text", {})),
            tokens=MolmoSpecialTokens(**d.get("tokens", {})),
        )

    def replace(self, **changes: Any) -> MolmoConfig:
        return dataclasses.replace(self, **changes)


def _connector_for(text: MolmoTextConfig, vision: MolmoVisionConfig) -> MolmoPoolingConfig:
    return MolmoPoolingConfig(
        hidden_size=vision.hidden_size,
        num_heads=vision.num_heads,
        head_dim=vision.head_dim,
        projector_hidden_size=text.intermediate_size // 2,
    )


def _preset(name: str, text: MolmoTextConfig, tokens: MolmoSpecialTokens,
            vision: MolmoVisionConfig | None = None) -> MolmoConfig:
    vision = vision or MolmoVisionConfig()
    return MolmoConfig(name=name, vision=vision, pooling=_connector_for(text, vision),
                       text=text, tokens=tokens)


_QWEN2_TOKENS = MolmoSpecialTokens()
_OLMO_TOKENS = MolmoSpecialTokens(bos=100257, eos=100257, pad=100277, im_start=100278,
                                  im_end=100279, im_patch=100280, im_col=100281, image=100282)
_OLMOE_TOKENS = MolmoSpecialTokens(bos=50279, eos=50279, pad=1, im_start=50280, im_end=50281,
                                   im_patch=50282, im_col=50283, image=50284)

# Byte-level demo tokenizer (molmo_export.demo): 256 byte tokens, <|endoftext|> = 256, and the
# five image specials on the first rows of the extra ("new") embedding table, as in 7B-D.
_DEMO_TOKENS = MolmoSpecialTokens(bos=256, eos=256, pad=256, im_start=512, im_end=513,
                                  im_patch=514, im_col=515, image=516)

PRESETS: dict[str, MolmoConfig] = {
    "molmo-7b-d-0924": _preset("molmo-7b-d-0924", MolmoTextConfig(), _QWEN2_TOKENS),
    "molmo-7b-o-0924": _preset(
        "molmo-7b-o-0924",
        MolmoTextConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        intermediate_size=22016, vocab_size=100278, embedding_size=100352,
                        qkv_bias=False, qk_norm=True, norm_after=True, layer_norm_eps=1e-6,
                        rope_theta=5e5),
        _OLMO_TOKENS),
    "molmoe-1b-0924": _preset(
        "molmoe-1b-0924",
        MolmoTextConfig(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                        intermediate_size=2048, vocab_size=50280, embedding_size=50304,
                        qkv_bias=False, qk_norm=True, layer_norm_eps=1e-5, rope_theta=1e4,
                        max_position_embeddings=32768, moe_num_experts=64, moe_top_k=8),
        _OLMOE_TOKENS),
    "molmo-72b-0924": _preset(
        "molmo-72b-0924",
        MolmoTextConfig(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                        intermediate_size=59136, layer_norm_eps=1e-5),
        _QWEN2_TOKENS),
    # The built-in default of every command: a tiny Molmo TRAINED on the shapes task
    # (molmo_export.train_demo; weights shipped in molmo_export/weights/, docs/demo_model.md).
    # 112 px crops (8x8 patches -> 4x4 image tokens a crop) keep training on a CPU fast.
    "demo": _preset(
        "demo",
        MolmoTextConfig(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                        intermediate_size=384, vocab_size=512, embedding_size=512),
        _DEMO_TOKENS,
        MolmoVisionConfig(image_size=112, hidden_size=64, num_heads=4, head_dim=16,
                          intermediate_size=192, num_layers=2, vit_layers=(-1, -2))),
    # Small, deterministic random weights (fixed seed) at the full 336 px geometry: structure
    # and speed tests.
    "demo-random": _preset(
        "demo-random",
        MolmoTextConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                        intermediate_size=384, vocab_size=512, embedding_size=512),
        _DEMO_TOKENS,
        MolmoVisionConfig(hidden_size=64, num_heads=4, head_dim=16, intermediate_size=128,
                          num_layers=3, vit_layers=(-2, -3))),
    # Molmo-shaped benchmark model with random weights: ViT-B-class encoder at 336 px / 14 px
    # patches, Qwen2-0.5B-class decoder. Large enough that CPU timings mean something.
    "bench-0.5b": _preset(
        "bench-0.5b",
        MolmoTextConfig(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                        head_dim=64, intermediate_size=9728, vocab_size=151936,
                        embedding_size=151936),
        _DEMO_TOKENS.__class__(bos=256, eos=256, pad=256, im_start=151936, im_end=151937,
                               im_patch=151938, im_col=151939, image=151940),
        MolmoVisionConfig(hidden_size=768, num_heads=12, head_dim=64, intermediate_size=3072,
                          num_layers=12, vit_layers=(-2, -9))),
}

# Presets whose weights are generated in code (molmo_export.demo), not read from a checkpoint.
RANDOM_WEIGHT_PRESETS = ("demo-random", "bench-0.5b")
# Presets whose trained weights ship with the package (molmo_export/weights/<name>.safetensors).
TRAINED_PRESETS = ("demo",)
# Every preset `materialize_preset` can build a checkpoint folder for.
BUILTIN_PRESETS = TRAINED_PRESETS + RANDOM_WEIGHT_PRESETS


def get_preset(name: str) -> MolmoConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Reading the config of a checkpoint directory (torch-free)
# ---------------------------------------------------------------------------------------------
#
# Three layouts exist (spec §9.1, golden README §5/§7/§8):
#   * hub `config.json` of the dense models (7B-D, 7B-O, 72B): LLM fields only (`hidden_size`,
#     `num_hidden_layers`, ...); the vision tower and connector are hard-coded in the official
#     `MolmoForCausalLM.__init__` (the CLIP ViT-L/14-336 of MolmoVisionConfig()).
#   * `full_config.json` (FullMolmoConfig as JSON, e.g. the golden tiny models, our demo presets):
#     the complete OLMo-style model config incl. `vision_backbone` and `vit_layers`. Where a
#     checkpoint carries it, the vision and connector settings are taken from it.
#   * MolmoE's hub `config.json`: the same complete OLMo-style config (`d_model`, `n_layers`,
#     `moe_*`, `vision_backbone`).

CONFIG_FILE = "config.json"
FULL_CONFIG_FILE = "full_config.json"
_SPECIAL_STRINGS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
_SPECIAL_FIELDS = ("im_start", "im_end", "im_patch", "im_col", "image")


class CheckpointError(MolmoError, ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the fix."""


def _read_json(path: Any) -> dict[str, Any]:
    import json
    from pathlib import Path

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download the checkpoint "
                              "file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object; re-download the checkpoint file")
    return data


def _require_setting(path: Any, cfg: dict[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    """Refuse settings the 0924 Molmo family never uses (and this implementation does not do)."""
    if key in cfg and cfg[key] not in allowed:
        raise CheckpointError(
            f"{path}: unsupported setting {key}={cfg[key]!r} (supported: "
            f"{', '.join(repr(a) for a in allowed)}); this is not a Molmo-0924-family "
            "checkpoint this toolkit can run")


def _vision_from_full(path: Any, cfg: dict[str, Any]) -> tuple[MolmoVisionConfig,
                                                             MolmoPoolingConfig]:
    vb = cfg.get("vision_backbone")
    if not isinstance(vb, dict):
        raise CheckpointError(f"{path} has no 'vision_backbone' section; it is not a complete "
                              "Molmo model config")
    for key, allowed in (("image_pooling_2d", ("attention-meanq",)), ("image_projector", ("mlp",)),
                         ("image_padding_embed", ("pad_and_partial_pad",)),
                         ("use_cls_feature", (False,))):
        _require_setting(path, cfg, key, allowed)
    _require_setting(path, vb, "image_mlp_activations", ("quick_gelu",))
    size = vb.get("image_default_input_size", [336, 336])
    if size[0] != size[1]:
        raise CheckpointError(f"{path}: non-square image_default_input_size {size} is not "
                              "supported")
    heads = int(vb["image_num_heads"])
    if int(vb.get("image_num_key_value_heads", heads)) != heads:
        raise CheckpointError(f"{path}: a ViT with grouped KV heads is not a Molmo-0924 tower")
    vision = MolmoVisionConfig(
        image_size=int(size[0]), patch_size=int(vb["image_patch_size"]),
        hidden_size=int(vb["image_emb_dim"]), num_heads=heads, head_dim=int(vb["image_head_dim"]),
        intermediate_size=int(vb["image_mlp_dim"]), num_layers=int(vb["image_num_layers"]),
        layer_norm_eps=float(vb["image_norm_eps"]),
        vit_layers=tuple(int(i) for i in cfg.get("vit_layers", (-1,))),
        activation=str(vb.get("image_mlp_activations", "quick_gelu")))
    if vb.get("image_num_pos", vision.num_positions) != vision.num_positions:
        raise CheckpointError(f"{path}: image_num_pos {vb['image_num_pos']} != "
                              f"{vision.num_positions}; positional-embedding interpolation is not "
                              "supported")
    if (cfg.get("image_pooling_h", 2), cfg.get("image_pooling_w", 2)) != (2, 2):
        raise CheckpointError(f"{path}: only 2x2 image pooling is supported")
    return vision, MolmoPoolingConfig()  # connector widths are derived below (_connector_for)


def _text_from_full(path: Any, cfg: dict[str, Any]) -> MolmoTextConfig:
    """OLMo-style ModelConfig fields (full_config.json, MolmoE config.json)."""
    for key, allowed in (("layer_norm_type", ("rms",)), ("rope_impl", ("llama",)),
                         ("activation_type", ("swiglu",)), ("clip_qkv", (None,)),
                         ("weight_tying", (False,)), ("alibi", (False,)), ("rope", (True,)),
                         ("scale_logits", (False,)), ("moe_shared_expert", (False,)),
                         ("block_type", ("sequential", "moe")), ("include_bias", (False,)),
                         ("multi_query_attention", (None, False)),
                         ("attn_logit_softcapping", (None,)), ("final_logit_softcapping", (None,)),
                         ("normalize_input_embeds", (False,))):
        _require_setting(path, cfg, key, allowed)
    d, heads = int(cfg["d_model"]), int(cfg["n_heads"])
    mlp = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * d
    moe = cfg.get("block_type") == "moe"
    return MolmoTextConfig(
        hidden_size=d, num_layers=int(cfg["n_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("n_kv_heads") or heads),
        head_dim=int(cfg.get("head_dim") or d // heads), intermediate_size=int(mlp),
        vocab_size=int(cfg["vocab_size"]),
        embedding_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
        additional_vocab_size=int(cfg.get("additional_vocab_size") or 0),
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_norm=bool(cfg.get("attention_layer_norm", False)),
        norm_after=bool(cfg.get("norm_after", False)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        max_position_embeddings=int(cfg.get("max_position_embeddings")
                                    or cfg.get("max_sequence_length") or 4096),
        moe_num_experts=int(cfg.get("moe_num_experts", 0)) if moe else 0,
        moe_top_k=int(cfg.get("moe_top_k", 0)) if moe else 0)


def _text_from_hub(path: Any, cfg: dict[str, Any]) -> MolmoTextConfig:
    """The dense hub config.json (config_molmo.MolmoConfig): LLM fields only."""
    for key, allowed in (("layer_norm_type", ("rms",)), ("clip_qkv", (None,)),
                         ("weight_tying", (False,)), ("use_position_ids", (True,))):
        _require_setting(path, cfg, key, allowed)
    d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return MolmoTextConfig(
        hidden_size=d, num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=d // heads,
        intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
        embedding_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
        additional_vocab_size=128,  # hard-coded in the official MolmoForCausalLM.__init__
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_norm=bool(cfg.get("attention_layer_norm", False)),
        norm_after=bool(cfg.get("norm_after", False)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096))


def _is_full_config(cfg: dict[str, Any]) -> bool:
    return "d_model" in cfg and "vision_backbone" in cfg


def _check_molmo(path: Any, cfg: dict[str, Any]) -> None:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    known = {"MolmoForCausalLM", "OLMoForCausalLM"}
    if model_type != "molmo" or (archs and not set(archs) & known):
        raise CheckpointError(
            f"{path}: unknown architecture (model_type={model_type!r}, architectures={archs}); "
            "expected an AllenAI Molmo-0924 checkpoint (model_type 'molmo', MolmoForCausalLM). "
            "Point --model at the downloaded Molmo hub folder")


def _tokens_from_tokenizer_files(directory: Any) -> MolmoSpecialTokens | None:
    """Special ids from the tokenizer files, as the fast tokenizer resolves them.

    tokenizer.json wins over added_tokens.json (MolmoE's added_tokens.json is stale, spec §7.1);
    EOS/BOS/pad strings come from special_tokens_map.json or tokenizer_config.json. The
    tokenizers have no BOS: the processor prepends EOS (spec §7.2).
    """
    from pathlib import Path

    directory = Path(directory)
    ids: dict[str, int] = {}
    tok_json = directory / "tokenizer.json"
    if tok_json.is_file():
        tj = _read_json(tok_json)
        ids.update((str(t["content"]), int(t["id"])) for t in tj.get("added_tokens", []))
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            for s in _SPECIAL_STRINGS + ("<|endoftext|>",):
                if s not in ids and s in vocab:
                    ids[s] = int(vocab[s])
    elif (directory / "added_tokens.json").is_file():
        ids.update((k, int(v)) for k, v in _read_json(directory / "added_tokens.json").items())
    else:
        return None
    if not all(s in ids for s in _SPECIAL_STRINGS):
        return None

    def token_string(key: str) -> str | None:
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                value = _read_json(directory / name).get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    return value
        return None

    eos_str = token_string("eos_token") or "<|endoftext|>"
    if eos_str not in ids:
        return None
    eos = ids[eos_str]
    bos_str, pad_str = token_string("bos_token"), token_string("pad_token")
    return MolmoSpecialTokens(
        bos=ids.get(bos_str, eos) if bos_str else eos, eos=eos,
        pad=ids.get(pad_str, eos) if pad_str else eos,
        **{f: ids[s] for f, s in zip(_SPECIAL_FIELDS, _SPECIAL_STRINGS)})


def _tokens_by_rule(text: MolmoTextConfig) -> MolmoSpecialTokens:
    """Special ids when the checkpoint carries no tokenizer files.

    A real-size model gets its family's ids. A smaller vocabulary is a test model whose inputs
    were tokenized with the Qwen2 tokenizer and remapped into the small vocabulary, as the golden
    tiny models are (golden README §5.3, §7.3, §8.5): the five image specials go to `base + k`,
    with base = embedding_size for the 7B-D/72B layout (specials on the `new_embedding` rows)
    and base = vocab_size for the OLMo layouts (7B-O, MolmoE: rows of the base table); every
    other id becomes `id % vocab_size`, so BOS/EOS 151643 -> 643 for a 1000-token vocabulary.
    """
    for preset in PRESETS.values():
        if (preset.text.vocab_size, preset.text.embedding_size) == (text.vocab_size,
                                                                     text.embedding_size):
            return preset.tokens
    olmo_layout = text.qk_norm  # 7B-O and MolmoE; the Qwen2 models have no QK-norm
    base = text.vocab_size if olmo_layout else text.embedding_size
    qwen = _QWEN2_TOKENS
    return MolmoSpecialTokens(
        bos=qwen.bos % text.vocab_size, eos=qwen.eos % text.vocab_size,
        pad=qwen.pad % text.vocab_size,
        **{f: base + k for k, f in enumerate(_SPECIAL_FIELDS)})


def special_tokens_from_checkpoint(directory: Any, text: MolmoTextConfig) -> MolmoSpecialTokens:
    """Special ids of a checkpoint: its tokenizer files if present, else the rule above."""
    return _tokens_from_tokenizer_files(directory) or _tokens_by_rule(text)


def _name_for(vision: MolmoVisionConfig, text: MolmoTextConfig, directory: Any) -> str:
    from pathlib import Path

    for name, preset in PRESETS.items():
        if preset.vision == vision and preset.text == text:
            return name
    return Path(directory).resolve().name or "custom"


def config_from_checkpoint(directory: Any) -> MolmoConfig:
    """MolmoConfig of an official checkpoint directory (torch-free).

    Reads config.json (dense hub format or MolmoE's full OLMo-style format) and, where present,
    full_config.json for the vision tower and connector; special ids as
    `special_tokens_from_checkpoint`.
    """
    from pathlib import Path

    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file; pass the checkpoint folder that holds it "
                              "(config.json and the *.safetensors files)")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist; pass the folder "
                              "that holds config.json and the *.safetensors files")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a Molmo checkpoint folder needs the hub "
                              "config.json beside its weights; download it with the weights")
    cfg = _read_json(path)
    _check_molmo(path, cfg)
    try:
        if _is_full_config(cfg):
            text = _text_from_full(path, cfg)
            vision, _ = _vision_from_full(path, cfg)
        else:
            text = _text_from_hub(path, cfg)
            vision = MolmoVisionConfig()  # the fixed CLIP tower of the official code
        full_path = directory / FULL_CONFIG_FILE
        if full_path.is_file():
            vision, _ = _vision_from_full(full_path, _read_json(full_path))
    except KeyError as e:
        raise CheckpointError(f"{path} lacks the field {e.args[0]!r}; re-download the "
                              "checkpoint's config.json") from None
    if text.num_heads % text.num_kv_heads or text.hidden_size != text.num_heads * text.head_dim:
        raise CheckpointError(f"{path}: inconsistent attention sizes (d_model "
                              f"{text.hidden_size}, {text.num_heads} heads, {text.num_kv_heads} "
                              "KV heads)")
    tokens = special_tokens_from_checkpoint(directory, text)
    return MolmoConfig(name=_name_for(vision, text, directory), vision=vision,
                       pooling=_connector_for(text, vision), text=text, tokens=tokens)
