"""A PyTorch fp32 reference that never holds the whole model: the quality measurement of a
quantized artifact where the fp32 model does not fit (7B: ~30 GB; docs/scale.md).

    vision encoder, connector   materialised whole in fp32 (~1.2 GB at 7B), run on every
                                sample, freed
    token embeddings            only the rows the sequences use (CheckpointWeights.rows)
    decoder layers              one at a time: materialised in fp32 (~0.9 GB at 7B), every
                                sample's whole sequence through it (full causal attention, no
                                KV cache), freed
    final norm, LM head         at the compared positions only; the head by row blocks

The math is the reference model's (molmo_export.model): its modules are built on the meta device
and given real weights one submodule at a time. Teacher-forced: each sample's sequence is its
prompt followed by tokens chosen elsewhere (the quantized artifact's own greedy generation), so
one pass over the checkpoint gives the reference's logits at every generated position. The
reference's own greedy sequence agrees with those tokens up to the first position where its
argmax differs, so the greedy-prefix metric is exact too.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from molmo_calibration.decoder_parts import generate_in_parts, parts_for, split_decoder
from molmo_calibration.evaluate import (
    Encoded,
    GraphRunner,
    PreparedSample,
    Trace,
    encode_images,
    run_sample,
)
from molmo_export.model import MolmoForConditionalGeneration
from molmo_export.model.layers import causal_padding_mask, rope_cos_sin
from molmo_export.weights import CheckpointWeights
from molmo_runtime.graph_io import DECODER
from molmo_runtime.manifest import Manifest

REFERENCE = "layer-streamed PyTorch fp32, teacher-forced"
HEAD_BLOCK_BYTES = 64 * 2**20  # fp32 bytes of LM-head rows materialised at once
EMBED = "language_model.model.embed_tokens.weight"
HEAD = "language_model.lm_head.weight"

Log = Callable[[str], None]


class LayerStreamedReference:
    """The reference model's outputs with one submodule's weights in memory at a time."""

    def __init__(self, weights: CheckpointWeights, log: Log = print,
                 head_block_bytes: int = HEAD_BLOCK_BYTES) -> None:
        self.weights, self.log, self.head_block_bytes = weights, log, head_block_bytes
        self._whole: dict[str, torch.Tensor] = {}  # parameters the checkpoint cannot read by rows
        with torch.device("meta"):
            self.skeleton = MolmoForConditionalGeneration(weights.config).eval()
        self._prefix = {id(m): n for n, m in self.skeleton.named_modules()}

    def _load(self, module: nn.Module) -> nn.Module:
        prefix = self._prefix[id(module)]
        state = {n: self.weights.get(f"{prefix}.{n}", torch.float32)
                 for n, _ in module.named_parameters()}
        module.load_state_dict(state, assign=True)
        return module

    @staticmethod
    def _free(module: nn.Module) -> None:
        module.to(device="meta")
        gc.collect()

    def traces(self, samples: Sequence[PreparedSample], token_ids: Sequence[np.ndarray]
               ) -> list[Trace]:
        """Per sample: vision features, image tokens and the logits [N, vocab] at the prompt's
        last position and after each of token_ids[:-1] (what run_sample records for N tokens);
        Trace.token_ids are the reference's argmaxes there."""
        with torch.no_grad():
            features, tokens = self._encode_images(samples)
            hidden = self._decoder(samples, token_ids, tokens)
            logits = self._head(hidden)
        return [Trace(f, t, np.argmax(r, axis=-1).astype(np.int64), r)
                for f, t, r in zip(features, tokens, logits)]

    def _encode_images(self, samples: Sequence[PreparedSample]
                       ) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
        features: list[np.ndarray | None] = [None] * len(samples)
        tokens: list[np.ndarray | None] = [None] * len(samples)
        with_images = [i for i, s in enumerate(samples) if s.images is not None]
        if not with_images:
            return features, tokens
        start = time.perf_counter()
        vision = self._load(self.skeleton.vision)
        seen: dict[bytes, np.ndarray] = {}  # prompts on one image share its crops
        for i in with_images:
            images = samples[i].images
            assert images is not None
            key = hashlib.sha256(images.tobytes()).digest()
            if key not in seen:
                seen[key] = vision(torch.from_numpy(images)).numpy()
            features[i] = seen[key]
        self._free(vision)
        connector = self._load(self.skeleton.connector)
        for i in with_images:
            tokens[i] = connector(torch.from_numpy(features[i]),
                                  torch.from_numpy(samples[i].image_masks)).numpy()
        self._free(connector)
        self.log(f"[reference] vision encoder + connector: {len(with_images)} samples "
                 f"({time.perf_counter() - start:.1f} s)")
        return features, tokens

    def _embed(self, ids: np.ndarray) -> torch.Tensor:
        """[L] ids -> [1, L, D]: the rows of the ids used, as model.embed reads them."""
        ids = np.clip(ids, 0, None)
        used, inverse = np.unique(ids, return_inverse=True)
        rows = torch.stack([self._rows(EMBED, int(r), int(r) + 1)[0] for r in used])
        return rows[torch.from_numpy(inverse.reshape(-1))][None]

    def _rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        block = None if name in self._whole else self.weights.rows(name, r0, r1, torch.float32)
        if block is None:
            if name not in self._whole:
                self._whole[name] = self.weights.get(name, torch.float32)
            block = self._whole[name][r0:r1]
        return block

    def _decoder(self, samples: Sequence[PreparedSample], token_ids: Sequence[np.ndarray],
                 image_tokens: Sequence[np.ndarray | None]) -> list[torch.Tensor]:
        """Hidden states after the final norm at the compared positions, per sample [N, D]."""
        xs, rope, masks, keep = [], [], [], []
        for s, ids, tok in zip(samples, token_ids, image_tokens):
            seq = np.concatenate([s.input_ids, np.asarray(ids, np.int64)[:-1]])
            x = self._embed(seq)
            if tok is not None and s.image_input_idx is not None:
                x = MolmoForConditionalGeneration.add_image_tokens(
                    x, torch.from_numpy(tok)[None], torch.from_numpy(s.image_input_idx)[None])
            text = self.skeleton.config.text
            rope.append(rope_cos_sin(torch.arange(len(seq))[None], text.head_dim,
                                     text.rope_theta))
            masks.append(causal_padding_mask(torch.ones(1, len(seq), dtype=torch.int64),
                                             len(seq)))
            xs.append(x)
            keep.append(len(s.input_ids) - 1)
        self._whole.clear()
        layers = self.skeleton.language_model.model.layers
        for n, layer in enumerate(layers, 1):
            start = time.perf_counter()
            self._load(layer)
            for i, ((cos, sin), allowed) in enumerate(zip(rope, masks)):
                xs[i] = layer(xs[i], cos, sin, allowed, None)[0]
            self._free(layer)
            self.log(f"[reference] decoder layer {n}/{len(layers)}: {len(xs)} samples "
                     f"({time.perf_counter() - start:.1f} s)")
        norm = self._load(self.skeleton.language_model.model.norm)
        out = [norm(x[0, k:]) for x, k in zip(xs, keep)]
        self._free(norm)
        return out

    def _head(self, hidden: list[torch.Tensor]) -> list[np.ndarray]:
        """LM-head logits [N, vocab] per sample, computed by row blocks of the head."""
        start = time.perf_counter()
        rows, cols = self.weights.shapes[HEAD]
        step = max(1, self.head_block_bytes // (cols * 4))
        allh = torch.cat(hidden)  # [positions, D]
        logits = torch.empty(allh.shape[0], rows, dtype=torch.float32)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            logits[:, r0:r1] = nn.functional.linear(allh, self._rows(HEAD, r0, r1))
        self._whole.clear()
        self.log(f"[reference] LM head: {allh.shape[0]} positions "
                 f"({time.perf_counter() - start:.1f} s)")
        return [p.numpy() for p in torch.split(logits, [h.shape[0] for h in hidden])]


def quantized_graph_files(manifest: Manifest) -> dict[str, Path]:
    """graph -> the quantized file ORT runs (trt-int8 keeps its quantized graphs in graphs_qdq,
    beside the fp32 ones TensorRT's parser reads)."""
    return {name: manifest.path(g["file"]) for name, g in
            manifest.raw.get("graphs_qdq", manifest.raw["graphs"]).items()}


def streamed_traces(manifest: Manifest, samples: Sequence[PreparedSample], new_tokens: int,
                    weights: CheckpointWeights, log: Log = print, scratch: Path | None = None
                    ) -> tuple[list[Trace], list[Trace]]:
    """(reference, quantized) traces: the artifact's own greedy generation on every sample first,
    its ONNX Runtime sessions closed before the reference reads a weight (the two peaks do not
    add up), then the layer-streamed reference teacher-forced on the generated tokens.
    scratch: where a large decoder's part graphs go while they run (None: the system's temp)."""
    _return_free_heap()
    files = quantized_graph_files(manifest)
    embed = np.load(manifest.path("embed_tokens.npy"), mmap_mode="r")

    def runner(graphs: list[str]) -> GraphRunner:
        # ORT gets the thread count torch runs the reference with (OMP_NUM_THREADS, ...)
        return GraphRunner({g: files[g] for g in graphs}, manifest.dims, embed,
                           torch.get_num_threads())

    # the images first, with the decoder's session not yet open (the peaks do not add up)
    start = time.perf_counter()
    images = runner([g for g in files if g != DECODER])
    encoded = [encode_images(images, s) for s in samples]
    del images
    _return_free_heap()
    log(f"[quantized] images of {len(samples)} samples encoded "
        f"({time.perf_counter() - start:.1f} s)")
    free = _generate(files[DECODER], runner, manifest, samples, encoded, new_tokens, scratch,
                     log)
    del encoded
    _return_free_heap()
    ref = LayerStreamedReference(weights, log).traces(samples, [t.token_ids for t in free])
    return ref, free


def _generate(decoder_file: Path, runner: Callable[[list[str]], GraphRunner], manifest: Manifest,
              samples: Sequence[PreparedSample], encoded: Sequence[Encoded], new_tokens: int,
              scratch: Path | None, log: Log) -> list[Trace]:
    """The quantized decoder's greedy tokens: the whole graph where it is small, else in parts
    (molmo_calibration.decoder_parts: one part's weights in memory at a time)."""
    layers = manifest.dims.num_layers
    parts = parts_for(decoder_file, layers)
    if parts > 1:
        with tempfile.TemporaryDirectory(prefix=".decoder-parts-", dir=scratch) as tmp:
            split = split_decoder(decoder_file, layers, parts, tmp)
            if split is not None:
                start = time.perf_counter()
                out = generate_in_parts(split, runner([]), manifest.dims, samples, encoded,
                                        new_tokens, torch.get_num_threads(), log)
                log(f"[quantized] {len(samples)} samples, {new_tokens} tokens each, decoder in "
                    f"{parts} parts ({time.perf_counter() - start:.1f} s)")
                return out
    decoder, free = runner([DECODER]), []
    for i, (s, enc) in enumerate(zip(samples, encoded), 1):
        start = time.perf_counter()
        free.append(run_sample(decoder, s, new_tokens, encoded=enc))
        log(f"[quantized {i}/{len(samples)}] held-out sample {s.name}: {new_tokens} tokens "
            f"({time.perf_counter() - start:.1f} s)")
    return free


def _return_free_heap() -> None:
    """Give the heap's free pages back to the OS: glibc keeps what the export phase (or the
    closed sessions) freed (at 7B: 2.26 -> 2.01 GB before the sessions, and the reference phase
    starts at 2.6 GB instead of ~4.8)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
