"""The fused decoder run in parts, so that a quality measurement holds one part's weights at a time.

Running the 7B int4 decoder takes more memory than anything else in its quality measurement
(ONNX Runtime's prepacked 4-bit weights, scales and block sums: 5.3 GB, docs/scale.md). Where
the decoder is large, the measurement therefore cuts the artifact's own "ort" decoder graph at
layer boundaries into graphs that name the same external data file (no weight is copied or
rewritten), and generates greedily with all samples in lockstep: every sample's step through
part 1, whose session is then closed, then through part 2, and so on, one token at a time.
Every node and weight is the whole graph's, and so are the logits (a test compares them bit for
bit with the whole graph's on the demo). The cost is opening each part once per generated token.

Between layer i-1 and layer i the fused graph (molmo_export.export.ort_decoder) carries two
tensors: the MLP's output `l{i-1}.down` and the residual stream `l{i-1}.mlp.residual`.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from molmo_calibration.evaluate import (
    Encoded,
    GraphRunner,
    KVCache,
    PreparedSample,
    Trace,
    session_options,
)
from molmo_runtime.containment import inside
from molmo_runtime.errors import require
from molmo_runtime.graph_io import (
    GraphDims,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
)
from molmo_runtime.mapped_files import data_files, page_out_files
from molmo_runtime.onnx_refs import external_data_locations

PART_BYTES = 1536 * 2**20  # most weight-file bytes a part holds (7B int4: 3 parts)


@dataclass(frozen=True)
class DecoderPart:
    path: Path
    layers: range
    inputs: tuple[str, ...]  # the boundary tensors from the part before (none for the first)
    outputs: tuple[str, ...]  # the boundary tensors for the next part, or ("logits",)


def boundary(layer: int) -> tuple[str, str]:
    """The tensors entering `layer` from the layer before it (ort_decoder's names)."""
    return f"l{layer - 1}.down", f"l{layer - 1}.mlp.residual"


def parts_for(decoder: str | os.PathLike[str], num_layers: int) -> int:
    """How many parts keep each one's share of the weight files under PART_BYTES."""
    size = sum(f.stat().st_size for f in data_files(decoder)) + Path(decoder).stat().st_size
    return max(1, min(num_layers, math.ceil(size / PART_BYTES)))


def split_decoder(decoder: str | os.PathLike[str], num_layers: int, parts: int,
                  out_dir: str | os.PathLike[str]) -> list[DecoderPart] | None:
    """Write into the empty folder `out_dir` `parts` graphs that together compute `decoder`,
    beside hard links to its data files (ONNX Runtime reads external data only from the
    graph's own folder; a link copies nothing and leaves the original alone). None where the
    graph is not the fused decoder (no layer boundaries) or the files cannot be linked there
    (another file system): the caller runs the whole graph."""
    import onnx
    from onnx import TensorProto, helper

    decoder, out_dir = Path(decoder), Path(out_dir)
    model = onnx.load(str(decoder), load_external_data=False)
    graph = model.graph
    produced = {o for n in graph.node for o in n.output}
    cuts = [round(k * num_layers / parts) for k in range(parts + 1)]
    if any(name not in produced for c in cuts[1:-1] for name in boundary(c)):
        return None
    for location in sorted(external_data_locations(decoder)):
        # a location that leaves the graph's folder, in name or by a symlink, is refused
        # (ArtifactError) before anything is linked
        source = inside(decoder.parent, location, f"external data of {decoder.name}")
        try:
            (out_dir / location).parent.mkdir(parents=True, exist_ok=True)
            os.link(source, out_dir / location)
        except OSError:
            return None
    by_output = {o: n for n in graph.node for o in n.output if o}
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    graph_outputs = {o.name: o for o in graph.output}
    out: list[DecoderPart] = []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        inputs = boundary(a) if a else ()
        outputs = boundary(b) if b < num_layers else ("logits",)
        presents = [f(i) for i in range(a, b) for f in (present_key_name, present_value_name)]
        # the nodes the outputs need, back to the boundary, the graph's inputs or initializers
        needed, stack = set(), [*outputs, *presents]
        while stack:
            name = stack.pop()
            node = by_output.get(name)
            if name in inputs or node is None or id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
        nodes = [n for n in graph.node if id(n) in needed]
        used = {i for n in nodes for i in n.input}
        hidden = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", None])
                  for name in inputs]
        part_graph = helper.make_graph(
            nodes, f"{graph.name}_part{k}",
            hidden + [v for name, v in graph_inputs.items() if name in used],
            [graph_outputs[o] if o in graph_outputs else
             helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", "seq", None])
             for o in [*outputs, *presents]],
            initializer=[t for name, t in initializers.items() if name in used])
        part_model = helper.make_model(part_graph, opset_imports=model.opset_import,
                                       producer_name=model.producer_name)
        path = out_dir / f"{decoder.stem}.part{k}.onnx"
        onnx.save(part_model, str(path))
        out.append(DecoderPart(path, range(a, b), tuple(inputs), tuple(outputs)))
    return out


def generate_in_parts(parts: Sequence[DecoderPart], embedder: GraphRunner, dims: GraphDims,
                      samples: Sequence[PreparedSample], encoded: Sequence[Encoded],
                      new_tokens: int, threads: int | None,
                      log: Callable[[str], None] = print) -> list[Trace]:
    """run_sample's greedy generation for every sample (`encoded`: its images through the
    vision encoder and connector), the decoder run part by part; `embedder` gives the input
    embeddings (GraphRunner.embed; its sessions are not used)."""
    ort: Any = require("onnxruntime", "quant", "quantization")
    options = session_options(threads)
    n = len(samples)
    embeds = [embedder.embed(s.input_ids, enc[1], s.image_input_idx)
              for s, enc in zip(samples, encoded)]
    caches = [KVCache.empty(dims, e.shape[1] + new_tokens) for e in embeds]
    ids: list[list[int]] = [[] for _ in range(n)]
    rows: list[list[np.ndarray]] = [[] for _ in range(n)]
    for step in range(new_tokens):  # step 0: the prompt; then one token each
        carry: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
        for part in parts:
            with page_out_files(data_files(part.path)):
                session = ort.InferenceSession(str(part.path), options,
                                               providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            wanted = {i.name for i in session.get_inputs()}
            for j in range(n):
                feed = _feed(wanted, embeds[j], caches[j], part, carry[j])
                outs = dict(zip(names, session.run(None, feed)))
                _store_presents(outs, caches[j], part)
                carry[j] = {name: outs[name] for name in part.outputs}
            del session
            gc.collect()
        for j in range(n):
            caches[j].length += embeds[j].shape[1]
            logits = carry[j]["logits"][0, -1]
            rows[j].append(logits)
            ids[j].append(int(np.argmax(logits)))
            embeds[j] = embedder.embed(np.array([ids[j][-1]]), None, None)
        log(f"[quantized, decoder in {len(parts)} parts] step {step + 1}/{new_tokens} of "
            f"{n} samples")
    return [Trace(enc[0], enc[1], np.array(i, np.int64), np.stack(r))
            for enc, i, r in zip(encoded, ids, rows)]


def _feed(wanted: set[str], embeds: np.ndarray, cache: KVCache, part: DecoderPart,
          carry: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The part's inputs (`wanted`: its session's input names) for `seq` new positions after
    cache.length valid ones (graph_io)."""
    seq = embeds.shape[1]
    total = cache.length + seq
    feed: dict[str, np.ndarray] = {
        "inputs_embeds": np.ascontiguousarray(embeds, np.float32),
        "attention_mask": np.ones((1, total), np.int64),
        "position_ids": np.arange(cache.length, total, dtype=np.int64)[None], **carry}
    for i in part.layers:
        feed[past_key_name(i)] = cache.keys[i]
        feed[past_value_name(i)] = cache.values[i]
    return {k: v for k, v in feed.items() if k in wanted}


def _store_presents(outs: dict[str, np.ndarray], cache: KVCache, part: DecoderPart) -> None:
    """The fused decoder returns each layer's whole cache buffer, new positions written."""
    for i in part.layers:
        cache.keys[i][...] = outs[present_key_name(i)]
        cache.values[i][...] = outs[present_value_name(i)]
