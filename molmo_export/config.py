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
    # Small, deterministic random weights (fixed seed): the built-in default of every command.
    "demo": _preset(
        "demo",
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
RANDOM_WEIGHT_PRESETS = ("demo", "bench-0.5b")


def get_preset(name: str) -> MolmoConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
