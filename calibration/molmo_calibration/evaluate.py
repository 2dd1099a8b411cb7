"""A small ONNX Runtime loop over the three graphs, for calibration and the quality report.

It runs one precision variant of an artifact's graphs (fp32, or a quantized copy) on prepared
samples the way the runtime does (molmo_runtime.graph_io): vision encoder -> connector ->
embedding gather with the image tokens ADDED at image_input_idx -> decoder prefill over the whole
prompt -> greedy decode steps, with the KV cache passed whole and `present` written at
[past, past + seq). Sessions are single-sample (batch 1); samples are independent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from molmo_calibration.calibration_set import CalibrationSample, CalibrationSet, Split
from molmo_runtime.embedding import add_image_tokens
from molmo_runtime.errors import InputError, require
from molmo_runtime.manifest import Manifest, load_manifest
from molmo_runtime.mapped_files import data_files, page_out_files
from molmo_runtime.graph_io import (
    CONNECTOR,
    DECODER,
    VISION_ENCODER,
    GraphDims,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
)


@dataclass(frozen=True)
class PreparedSample:
    """One calibration sample after the real Molmo preprocessing."""

    name: str
    split: Split
    input_ids: np.ndarray  # [L] int64
    images: np.ndarray | None  # [crops, 576, 588] f32 (None: text only)
    image_input_idx: np.ndarray | None  # [crops, 144] int32, -1 = no token
    image_masks: np.ndarray | None  # [crops, 576] f32


def prepare_samples(calibration_set: CalibrationSet,
                    artifact: Manifest | str | os.PathLike[str],
                    max_samples: int | None = None) -> list[PreparedSample]:
    """Preprocess every sample with the artifact's own processor (its listed tokenizer/ files +
    processor.json; nothing unlisted is read)."""
    from molmo_runtime.processing import MolmoProcessor

    manifest = artifact if isinstance(artifact, Manifest) else load_manifest(artifact)
    processor = MolmoProcessor.from_artifact(manifest)
    chosen = _take_balanced(calibration_set, max_samples)
    out = []
    for s in chosen:
        inputs = processor(images=str(s.image), text=s.prompt)
        out.append(PreparedSample(
            name=s.name, split=s.split,
            input_ids=np.asarray(inputs["input_ids"], np.int64).reshape(-1),
            images=_opt(inputs, "images", np.float32),
            image_input_idx=_opt(inputs, "image_input_idx", np.int32),
            image_masks=_opt(inputs, "image_masks", np.float32)))
    return out


def _take_balanced(cs: CalibrationSet, max_samples: int | None) -> list[CalibrationSample]:
    """At most max_samples, keeping the calibration/held-out proportion (at least one each)."""
    if max_samples is None or max_samples >= len(cs.samples):
        return list(cs.samples)
    if max_samples < 2:
        raise InputError("max_samples must be at least 2 (one calibration, one held-out sample)")
    held = cs.split("heldout")
    n_held = min(len(held), max(1, round(max_samples * len(held) / len(cs.samples))))
    return list(cs.split("calibration")[:max_samples - n_held]) + list(held[:n_held])


def _opt(inputs: Mapping[str, Any], key: str, dtype: type) -> np.ndarray | None:
    v = inputs.get(key)
    return None if v is None else np.ascontiguousarray(np.asarray(v, dtype))


def session_options(threads: int | None = None) -> Any:
    ort = require("onnxruntime", "quant", "quantization")
    so = ort.SessionOptions()  # type: ignore[attr-defined]
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # Run QDQ graphs (trt-int8) as written, DequantizeLinear then float maths, as TensorRT's
    # INT8 kernels compute them: ORT's fused CPU kernels for QDQ pairs sum u8 x s8 products in
    # int16 on AVX2-only CPUs and saturate (toy vision cosine 0.9975 instead of > 0.9998), which
    # would measure this CPU, not the recipe. No effect on dynamic or MatMulNBits graphs.
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


@dataclass
class KVCache:
    """Per-layer K and V buffers [1, kv_heads, capacity, head_dim]; `length` valid positions."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    length: int = 0

    @classmethod
    def empty(cls, dims: GraphDims, capacity: int) -> KVCache:
        shape = (1, dims.num_kv_heads, capacity, dims.head_dim)
        return cls([np.zeros(shape, np.float32) for _ in range(dims.num_layers)],
                   [np.zeros(shape, np.float32) for _ in range(dims.num_layers)])


class GraphRunner:
    """ORT sessions for one precision variant of the three graphs."""

    def __init__(self, files: Mapping[str, str | os.PathLike[str]], dims: GraphDims,
                 embed_tokens: np.ndarray, threads: int | None = None) -> None:
        ort = require("onnxruntime", "quant", "quantization")
        so = session_options(threads)
        self.dims = dims
        self.embed_tokens = embed_tokens  # [vocab rows + extra, D]
        self.sessions = {}
        for name, path in files.items():  # any subset of the three graphs
            with page_out_files(data_files(path)):  # the weights ORT copied (molmo_runtime)
                self.sessions[name] = ort.InferenceSession(  # type: ignore[attr-defined]
                    str(path), so, providers=["CPUExecutionProvider"])
        outputs = self.sessions[DECODER].get_outputs() if DECODER in files else []
        self._decoder_outputs = [o.name for o in outputs]
        # the "ort" decoder flavour (graph_io) returns the whole cache buffers as present.*
        self._whole_present = any(o.name == present_key_name(0) and o.shape[2] == "cache"
                                  for o in outputs)

    def vision(self, images: np.ndarray) -> np.ndarray:
        return self.sessions[VISION_ENCODER].run(None, {"images": images})[0]  # [crops, 576, F]

    def connector(self, features: np.ndarray, masks: np.ndarray) -> np.ndarray:
        return self.sessions[CONNECTOR].run(
            None, {"image_features": features, "image_masks": masks})[0]  # [crops, 144, D]

    def embed(self, input_ids: np.ndarray, image_tokens: np.ndarray | None,
              image_input_idx: np.ndarray | None) -> np.ndarray:
        """[L] ids -> [1, L, D]: table rows, plus image tokens ADDED at their positions."""
        x = self.embed_tokens[input_ids][None].astype(np.float32, copy=True)  # [1, L, D]
        if image_tokens is not None and image_input_idx is not None:
            add_image_tokens(x, image_tokens[None], image_input_idx[None])
        return x

    def decoder_feed(self, embeds: np.ndarray, cache: KVCache) -> dict[str, np.ndarray]:
        """Decoder inputs for `seq` new positions after cache.length valid ones (graph_io)."""
        seq = embeds.shape[1]
        total = cache.length + seq
        if total > cache.keys[0].shape[2]:
            raise InputError(f"KV cache of {cache.keys[0].shape[2]} positions is too small "
                             f"for {total}")
        feed = {"inputs_embeds": np.ascontiguousarray(embeds, np.float32),
                "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(cache.length, total, dtype=np.int64)[None]}
        for i in range(self.dims.num_layers):
            feed[past_key_name(i)] = cache.keys[i]
            feed[past_value_name(i)] = cache.values[i]
        return feed

    def decode(self, embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run `seq` new positions, append their K/V to the cache; logits of the last: [vocab]."""
        seq = embeds.shape[1]
        outs = dict(zip(self._decoder_outputs,
                        self.sessions[DECODER].run(None, self.decoder_feed(embeds, cache))))
        new = slice(None) if self._whole_present else slice(cache.length, cache.length + seq)
        for i in range(self.dims.num_layers):
            cache.keys[i][:, :, new] = outs[present_key_name(i)]
            cache.values[i][:, :, new] = outs[present_value_name(i)]
        cache.length += seq
        return outs["logits"][0, -1]


@dataclass(frozen=True)
class Trace:
    """Everything one variant computed for one sample."""

    features: np.ndarray | None  # [crops, 576, F]
    image_tokens: np.ndarray | None  # [crops, 144, D]
    token_ids: np.ndarray  # [N] generated (or forced) ids
    step_logits: np.ndarray  # [N, vocab]; row 0 = prefill logits


Encoded = tuple[np.ndarray | None, np.ndarray | None]  # (vision features, image tokens)


def encode_images(runner: GraphRunner, sample: PreparedSample) -> Encoded:
    if sample.images is None or sample.image_masks is None:
        return None, None
    features = runner.vision(sample.images)
    return features, runner.connector(features, sample.image_masks)


def run_sample(runner: GraphRunner, sample: PreparedSample, new_tokens: int,
               forced_ids: np.ndarray | None = None, encoded: Encoded | None = None) -> Trace:
    """Greedy decode `new_tokens` tokens, or teacher-force `forced_ids` (same length).
    `encoded`: the sample's images already through the vision encoder and connector (by
    encode_images, maybe with another runner), else the runner encodes them."""
    features, tokens = encode_images(runner, sample) if encoded is None else encoded
    embeds = runner.embed(sample.input_ids, tokens, sample.image_input_idx)  # [1, L, D]
    cache = KVCache.empty(runner.dims, embeds.shape[1] + new_tokens)
    logits = runner.decode(embeds, cache)
    ids, rows = [], []
    for step in range(new_tokens):
        rows.append(logits)
        nxt = int(np.argmax(logits)) if forced_ids is None else int(forced_ids[step])
        ids.append(nxt)
        if step + 1 < new_tokens:
            logits = runner.decode(runner.embed(np.array([nxt]), None, None), cache)
    return Trace(features, tokens, np.array(ids, np.int64),
                 np.stack(rows) if rows else np.zeros((0, runner.dims.vocab_rows), np.float32))
