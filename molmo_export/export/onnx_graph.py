"""Export one torch module to one ONNX file whose I/O is exactly a graph_io.GraphSpec."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch.export import Dim

from molmo_runtime.errors import MolmoError
from molmo_runtime.graph_io import GraphSpec, TensorSpec

DEFAULT_OPSET = 18  # portable decomposed form (LayerNormalization as one op): TensorRT 10.3+
# Example sizes of the named dims used for tracing. None may be 0 or 1: torch.export would
# specialise such a dim to a constant. past = total - seq = 3 here, inside a cache of 16.
EXAMPLE_SIZES = {"crops": 3, "batch": 2, "seq": 5, "total": 8, "cache": 16}
# Ranges torch.export must accept for each named dim (upper bounds are generous: the runtime
# limits come from the manifest, not from the graph).
DIM_RANGES = {"crops": (1, 1024), "batch": (1, 256), "seq": (1, 1 << 20),
              "total": (1, 1 << 20), "cache": (1, 1 << 20)}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def example_input(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    shape = spec.shape_for(EXAMPLE_SIZES)
    if spec.name == "attention_mask":
        return torch.ones(shape, dtype=torch.int64)
    if spec.name == "position_ids":  # positions past .. past + seq - 1
        past = EXAMPLE_SIZES["total"] - EXAMPLE_SIZES["seq"]
        return (torch.arange(shape[1]) + past).expand(shape).contiguous()
    if spec.name == "image_masks":
        return torch.rand(shape, generator=generator)
    return torch.randn(shape, generator=generator, dtype=_TORCH_DTYPES[spec.dtype])


def dynamic_shapes_for(spec: GraphSpec, varargs_from: int | None = None) -> tuple[Any, ...]:
    """Named dims -> torch.export Dims, one dict per input; inputs from `varargs_from` on are
    grouped into one nested tuple (they reach the module's forward as *args)."""
    dims: dict[str, Dim] = {}
    out = []
    for t in spec.inputs:
        axes = {}
        for axis, d in enumerate(t.dims):
            if isinstance(d, str):
                if d not in dims:
                    lo, hi = DIM_RANGES[d]
                    dims[d] = Dim(d, min=lo, max=hi)
                axes[axis] = dims[d]
        out.append(axes)
    if varargs_from is not None:
        return (*out[:varargs_from], tuple(out[varargs_from:]))
    return tuple(out)


def trace(module: torch.nn.Module, spec: GraphSpec, opset: int = DEFAULT_OPSET,
          optimize: bool = True) -> Any:
    """torch.onnx.export (dynamo) of `module` with the spec's I/O names and dynamic dims; the
    ONNXProgram. The exporter's chatter is kept and shown only when it fails."""
    gen = torch.Generator().manual_seed(0)
    args = tuple(example_input(t, gen) for t in spec.inputs)
    module.eval()
    log = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_shapes=dynamic_shapes_for(spec, getattr(module, "varargs_from", None)),
                optimize=optimize, verbose=False)
    except Exception as e:  # the exporter's own errors are long; keep its log for the user
        raise MolmoError(f"ONNX export of {spec.name} failed: {e}\n{log.getvalue()[-4000:]}") from e
    assert program is not None
    return program


def export_graph(module: torch.nn.Module, spec: GraphSpec, path: Path,
                 opset: int = DEFAULT_OPSET) -> None:
    """Trace `module` with dynamo and write `path` (+ `path.data` when weights exceed 2 GB).

    The caller writes into a staging directory; this function does not rename anything.
    """
    program = trace(module, spec, opset)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=nbytes > 1_800_000_000)
    check_graph_file(path, spec)


def check_graph_file(path: Path, spec: GraphSpec, checker: bool = True) -> None:
    """onnx.checker (by path, so external data works) and the I/O names/dtypes of the spec.
    checker=False for the decoder made for ONNX Runtime: its SimplifiedLayerNormalization is
    ONNX Runtime's, registered in the ai.onnx domain, and unknown to onnx.checker."""
    if checker:
        onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    want_in = [t.name for t in spec.inputs]
    want_out = [t.name for t in spec.outputs]
    if got_in != want_in or got_out != want_out:
        raise MolmoError(f"{path.name}: graph I/O {got_in} -> {got_out} does not match the "
                         f"spec {want_in} -> {want_out}")
    for value, t in zip(list(model.graph.input) + list(model.graph.output),
                        spec.inputs + spec.outputs):
        elem = value.type.tensor_type.elem_type
        if onnx.helper.tensor_dtype_to_np_dtype(elem) != np.dtype(t.dtype):
            raise MolmoError(f"{path.name}: {t.name} has dtype "
                             f"{onnx.helper.tensor_dtype_to_np_dtype(elem)}, spec says {t.dtype}")
