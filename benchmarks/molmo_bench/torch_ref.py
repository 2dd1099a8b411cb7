"""--compare-torch: the PyTorch reference model, timed by the same loops as the runtime.

`TorchBackend` implements the runtime's Backend interface with molmo_export's
MolmoForConditionalGeneration (fp32, eager, torch.inference_mode) and a preallocated KV cache
written in place, the same convention as the ONNX decoder (graph_io.py). Plugged into a
MolmoPipeline it runs the very generation loop the ONNX Runtime numbers come from, so the ratio
compares the compute engines, not two different loops. (The reference's own `generate` grows its
cache with torch.cat every step, which would make torch look slower than it need be.)

It runs in a child process (`TorchWorker`) that the benchmark drives step by step: the runtime
process never imports torch, the two stacks' steps can interleave (so both see the same machine
load), and the child's peak RSS is torch's alone.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from molmo_runtime.backends.base import Backend, cache_shape
from molmo_runtime.errors import InputError, MolmoError, require
from molmo_runtime.graph_io import GraphDims
from molmo_runtime.manifest import Manifest, load_manifest
from molmo_runtime.pipeline import MolmoPipeline

from molmo_bench.inputs import BenchInputs
from molmo_bench.measure import BenchSettings, StackBench


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: Any, dims: GraphDims) -> None:
        import torch

        self.torch = torch
        self.model = model.eval()
        self.dims = dims
        self._cache: list[Any] = []  # 2 * num_layers tensors [B, kv, max_seq, hd]
        self._length = 0

    def vision(self, images: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            features: np.ndarray = self.model.vision(self.torch.from_numpy(images)).numpy()
        return features

    def connector(self, image_features: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        t = self.torch
        with t.inference_mode():
            tokens: np.ndarray = self.model.connector(t.from_numpy(image_features),
                                                      t.from_numpy(image_masks)).numpy()
        return tokens

    def start(self, batch: int) -> None:
        if not self._cache or self._cache[0].shape[0] != batch:
            shape = cache_shape(self.dims, batch)
            with self.torch.inference_mode():
                self._cache = [self.torch.zeros(shape) for _ in range(2 * self.dims.num_layers)]
        self._length = 0

    @property
    def cache_length(self) -> int:
        return self._length

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> np.ndarray:
        t = self.torch
        lm = self.model.language_model
        past, seq = self._length, inputs_embeds.shape[1]
        if past + seq > self.dims.max_seq_len:
            raise InputError(f"sequence of {past + seq} tokens exceeds max_seq_len "
                             f"{self.dims.max_seq_len}")
        # Whole buffers, as the ONNX decoder gets them: attention reads the valid prefix
        # (its length is attention_mask's minus seq).
        cache = self._cache
        past_kv = [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)] if past else None
        with t.inference_mode():
            hidden, new_kv = lm.model(t.from_numpy(np.ascontiguousarray(inputs_embeds)),
                                      t.from_numpy(np.ascontiguousarray(position_ids)),
                                      t.from_numpy(np.ascontiguousarray(attention_mask)),
                                      past_kv)
            for i, (k, v) in enumerate(new_kv):
                cache[2 * i][:, :, past:past + seq] = k  # [B, kv, seq, hd]
                cache[2 * i + 1][:, :, past:past + seq] = v
            logits = lm.lm_head(hidden[:, -1])  # [B, V]
        self._length = past + seq
        out: np.ndarray = logits.numpy()
        return out


def decoder_weight_bytes(model: Any) -> int:
    """Bytes of the decoder weights a decode step reads (embedding table excluded, as for ORT)."""
    lm = model.language_model
    embed = {id(p) for p in lm.model.embed_tokens.parameters()}
    return sum(p.numel() * p.element_size() for p in lm.parameters() if id(p) not in embed)


def _check_same_weights(model: Any, manifest: Manifest, checkpoint: Path) -> None:
    """The checkpoint must be the one the artifact was exported from (config and embeddings)."""
    ours = json.loads(json.dumps(model.config.to_dict()))
    if ours != manifest.model_config:
        raise MolmoError(f"the checkpoint {checkpoint} has another config than the artifact "
                         f"{manifest.directory}; pass --torch-model with the checkpoint it was "
                         "exported from")
    table = np.load(manifest.path("embed_tokens.npy"), mmap_mode="r")  # [rows, D]
    rows = np.arange(0, table.shape[0], max(1, table.shape[0] // 64))
    weight = model.language_model.model.embed_tokens.weight.detach().numpy()
    if table.shape != weight.shape or not np.array_equal(table[rows], weight[rows]):
        raise MolmoError(f"the checkpoint {checkpoint} has other weights than the artifact "
                         f"{manifest.directory} (embedding rows differ); pass --torch-model with "
                         "the checkpoint it was exported from")


# The child process's state: one loaded reference and its measurements.
_BENCH: StackBench | None = None
_EXTRA: dict[str, Any] = {}


def _load(artifact_dir: str, torch_model: str | None, inputs: BenchInputs,
          settings: BenchSettings, threads: int, quiet: bool) -> None:
    """(In the child) load the reference on the artifact's source checkpoint."""
    global _BENCH
    torch: Any = require("torch", "export", "--compare-torch")
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    from molmo_export.export.onnx_export import resolve_checkpoint
    from molmo_export.model import MolmoForConditionalGeneration

    manifest = load_manifest(artifact_dir, verify="none")
    source = torch_model or manifest.raw["model"]["source"]
    checkpoint = resolve_checkpoint(source)
    model = MolmoForConditionalGeneration.from_pretrained(checkpoint).eval()
    _check_same_weights(model, manifest, checkpoint)
    processor = None
    if inputs.kind == "image":
        from molmo_runtime.processing import MolmoProcessor

        processor = MolmoProcessor.from_pretrained(Path(artifact_dir))
    pipe = MolmoPipeline(manifest, TorchBackend(model, manifest.dims), processor)
    _BENCH = StackBench("torch", pipe, inputs, settings,
                        log=lambda s: None if quiet else print(s, file=sys.stderr, flush=True))
    _EXTRA.update(weight_bytes=decoder_weight_bytes(model), checkpoint=str(checkpoint),
                  threads=torch.get_num_threads(), torch_version=torch.__version__)


def _step(kind: str, index: int) -> None:
    assert _BENCH is not None
    _BENCH.step(kind, index)


def _result() -> dict[str, Any]:
    assert _BENCH is not None
    return {**_BENCH.result(), **_EXTRA}


class TorchWorker:
    """The torch reference in a spawned child process, driven one step at a time, so its steps
    can interleave with the runtime's. The runtime process never imports torch, and the child's
    peak RSS is torch's alone."""

    def __init__(self, artifact_dir: str | os.PathLike[str], torch_model: str | None,
                 inputs: BenchInputs, settings: BenchSettings, threads: int,
                 quiet: bool = False) -> None:
        self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
        try:
            self._pool.submit(_load, str(artifact_dir), torch_model, inputs, settings,
                              threads, quiet).result()
        except BaseException:
            self.close()
            raise

    def step(self, kind: str, index: int) -> None:
        self._pool.submit(_step, kind, index).result()

    def result(self) -> dict[str, Any]:
        return self._pool.submit(_result).result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
