"""72B-shaped graphs build: traced with fake weights (no memory), checked by strict shape inference.

The vision encoder and connector are traced at full 72B shape. The decoder is traced with all of
72B's widths (d_model 8192, 64 heads / 8 KV heads, MLP 29568, vocab 152064) but 2 of its 80
layers in CI: layers are identical, and tracing 80 takes tens of minutes on a busy 2-core
machine; the full 80-layer trace is the slow test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from molmo_export.config import get_preset  # noqa: E402
from molmo_export.export.onnx_export import graph_dims  # noqa: E402
from molmo_export.export.onnx_graph import DEFAULT_OPSET  # noqa: E402
from molmo_export.export.streaming import fake_model, trace_template, weight_ref  # noqa: E402
from molmo_export.weights import parameter_shapes  # noqa: E402
from molmo_runtime.graph_io import all_graph_specs  # noqa: E402


def _trace_all(layers: int | None) -> None:
    cfg = get_preset("molmo-72b-0924")
    if layers is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=layers))
    shapes = parameter_shapes(cfg)

    def zeros(location: str) -> np.ndarray:  # small weights only: values do not matter here
        ref = weight_ref(location)
        assert ref is not None
        param, perm = ref
        shape = shapes[param]
        return np.zeros([shape[i] for i in perm] if perm else shape, np.float32)

    model = fake_model(cfg)
    specs = all_graph_specs(graph_dims(cfg, 12, 4096))
    for name, spec in specs.items():
        template = trace_template(model, name, spec, DEFAULT_OPSET, zeros)
        # strict shape inference: every node's types and shapes resolve (onnx.checker would
        # also open the external data, which here names checkpoint tensors, not files)
        onnx.shape_inference.infer_shapes(template, strict_mode=True)
        weights = {weight_ref(e.value)[0]  # type: ignore[index]
                   for t in template.graph.initializer for e in t.external_data
                   if e.key == "location" and weight_ref(e.value)}
        if name == "decoder":
            assert "language_model.lm_head.weight" in weights
            head = [t for t in template.graph.initializer if "lm_head" in t.name]
            assert any(152064 in t.dims and 8192 in t.dims for t in head)


def test_72b_graphs_trace_with_fake_weights() -> None:
    _trace_all(layers=2)


@pytest.mark.slow
@pytest.mark.heavy
def test_72b_graphs_trace_all_80_layers() -> None:
    _trace_all(layers=None)
