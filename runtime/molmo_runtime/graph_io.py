"""The I/O contract of the three Molmo graphs: one declarative spec per graph.

This module is the single source of tensor names, dimension names and dtypes for the exporter
(torch.onnx dynamic shapes), the manifest (written into manifest.json) and the runtimes (ORT and
TensorRT bind tensors by these names). Torch-free.

    vision_encoder:  images [crops, 576, 588]                    -> image_features [crops, 576, F]
    connector:       image_features [crops, 576, F],
                     image_masks [crops, 576]                     -> image_tokens [crops, 144, D]
    decoder:         inputs_embeds [batch, seq, D],
                     attention_mask [batch, total] (int64, total = past + seq),
                     position_ids [batch, seq] (int64),
                     past_key_values.{i}.key/value [batch, kv_heads, cache, head_dim]
                                                                  -> logits [batch, 1, vocab]
                                                                     present.{i}.key/value
                                                                       [batch, kv_heads, seq, head_dim]

Decoder cache convention (a portable form of "past/present share buffer"): the runtime owns one
preallocated cache per layer, [batch, kv_heads, max_seq_len, head_dim], and passes it whole as
`past_key_values.{i}.*`. The graph reads only the first `past = total - seq` positions of it (the
valid prefix; `total` is the length of attention_mask) and returns, as `present.{i}.*`, the keys
(after RoPE) and values of the `seq` new tokens only. The runtime writes those at positions
[past, past + seq) of its cache. So decode never copies or reallocates the cache on the host, and
the cache tensors bound to the session keep their address for the whole generation.
`logits` are those of the last position only (prefill never pays the LM head over the image
tokens); batches are left-padded so that the last position is every row's last token.

Decoder flavours (manifest `decoder_flavour`): "portable" is the graph above, plain ONNX ops
(TensorRT and any engine). "ort" is made for ONNX Runtime's contrib ops
(molmo_export/export/ort_decoder.py): same inputs, but `present.{i}.*` are the past buffers
themselves, [batch, kv_heads, cache, head_dim]: the runtime binds each present output to the
memory of its past input and the graph writes the new K/V into it at [past, past + seq) in place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Union

Dim = Union[int, str]

VISION_ENCODER = "vision_encoder"
CONNECTOR = "connector"
DECODER = "decoder"
GRAPH_NAMES = (VISION_ENCODER, CONNECTOR, DECODER)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
    dims: tuple[Dim, ...]  # ints are fixed sizes, strings name a dynamic dimension

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["dims"]))

    def shape_for(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape with every named dimension taken from `sizes`."""
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str  # relative to the artifact directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphSpec:
        return cls(d["name"], d["file"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]))

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class GraphDims:
    """Every model size the graph I/O depends on (stored in the manifest as `dims`)."""

    patches_per_crop: int  # 576
    patch_dim: int  # 588
    vision_feature_dim: int  # F: 2048 (two ViT layers concatenated)
    tokens_per_crop: int  # 144 after 2x2 pooling
    d_model: int  # D
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_rows: int  # LM head rows (= embedding_size)
    max_crops: int  # high-res crops; the vision graph takes up to max_crops + 1
    max_seq_len: int  # KV cache length the runtime preallocates

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphDims:
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def vision_encoder_spec(d: GraphDims) -> GraphSpec:
    return GraphSpec(
        VISION_ENCODER, "onnx/vision_encoder.onnx",
        inputs=(TensorSpec("images", "float32", ("crops", d.patches_per_crop, d.patch_dim)),),
        outputs=(TensorSpec("image_features", "float32",
                            ("crops", d.patches_per_crop, d.vision_feature_dim)),),
    )


def connector_spec(d: GraphDims) -> GraphSpec:
    return GraphSpec(
        CONNECTOR, "onnx/connector.onnx",
        inputs=(TensorSpec("image_features", "float32",
                           ("crops", d.patches_per_crop, d.vision_feature_dim)),
                TensorSpec("image_masks", "float32", ("crops", d.patches_per_crop))),
        outputs=(TensorSpec("image_tokens", "float32", ("crops", d.tokens_per_crop, d.d_model)),),
    )


DECODER_FLAVOURS = ("portable", "ort")


def decoder_spec(d: GraphDims, flavour: str = "portable") -> GraphSpec:
    if flavour not in DECODER_FLAVOURS:
        raise ValueError(f"decoder flavour {flavour!r}; expected one of {DECODER_FLAVOURS}")
    kv_past = ("batch", d.num_kv_heads, "cache", d.head_dim)
    kv_new = kv_past if flavour == "ort" else ("batch", d.num_kv_heads, "seq", d.head_dim)
    inputs = [
        TensorSpec("inputs_embeds", "float32", ("batch", "seq", d.d_model)),
        TensorSpec("attention_mask", "int64", ("batch", "total")),
        TensorSpec("position_ids", "int64", ("batch", "seq")),
    ]
    outputs = [TensorSpec("logits", "float32", ("batch", 1, d.vocab_rows))]
    for i in range(d.num_layers):
        inputs += [TensorSpec(past_key_name(i), "float32", kv_past),
                   TensorSpec(past_value_name(i), "float32", kv_past)]
        outputs += [TensorSpec(present_key_name(i), "float32", kv_new),
                    TensorSpec(present_value_name(i), "float32", kv_new)]
    return GraphSpec(DECODER, "onnx/decoder.onnx", tuple(inputs), tuple(outputs))


def all_graph_specs(d: GraphDims) -> dict[str, GraphSpec]:
    return {VISION_ENCODER: vision_encoder_spec(d), CONNECTOR: connector_spec(d),
            DECODER: decoder_spec(d)}
