"""Quantization for ONNX Runtime on CPU, by onnxruntime.quantization (no calibration data).

    int8-dynamic             quantize_dynamic: per-channel int8 weights of the weight MatMuls ->
                             DynamicQuantizeLinear + MatMulInteger (activations per call)
    int{8,4}-weight-only-nbits  MatMulNBitsQuantizer: blockwise symmetric weights -> MatMulNBits
                             with accuracy_level 4 (int8 compute: the fast CPU path)

Attention matmuls (two activations) are never touched (MatMulConstBOnly).
"""

from __future__ import annotations

import os
from pathlib import Path

from molmo_calibration.graph_tools import (
    ensure_node_names,
    lm_head_nodes,
    needs_external_data,
    onnx_module,
    quantization_module,
    save_model,
)
from molmo_calibration.recipes import GraphRecipe, Method

NBITS_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: the fast CPU kernels


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    q = quantization_module()
    q.quantize_dynamic(  # type: ignore[attr-defined]
        str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
        weight_type=q.QuantType.QInt8,  # type: ignore[attr-defined]
        # 7-bit weights: on x86 CPUs without VNNI (AVX2 only) ORT's U8S8 kernel adds pairs of
        # u8 x s8 products in int16 (VPMADDUBSW), which saturates with full 8-bit weights. An
        # artifact runs on CPUs unknown at export: measured on the demo on an AVX2-only EPYC,
        # vision cosine 0.9977 -> 0.99968 and decoder KL 0.016 -> 0.0019 nats (issue 13 note).
        reduce_range=True,
        use_external_data_format=needs_external_data(src),
        extra_options={"MatMulConstBOnly": True})


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int,
                   lm_head_bits: int | None, vocab_rows: int) -> None:
    """Weight-only MatMulNBits; the LM head gets `lm_head_bits` when given."""
    onnx = onnx_module()
    quantization_module()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    external = needs_external_data(src)
    model = ensure_node_names(onnx.load(str(src)))
    head = lm_head_nodes(model, vocab_rows) if lm_head_bits not in (None, bits) else []
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=NBITS_ACCURACY_LEVEL, nodes_to_exclude=head)
    q.process()
    model = q.model.model
    if head:  # the only float weight matmul left (nodes_to_include does not restrict)
        q = MatMulNBitsQuantizer(model, bits=lm_head_bits, block_size=block_size,
                                 is_symmetric=True, accuracy_level=NBITS_ACCURACY_LEVEL)
        q.process()
        model = q.model.model
    save_model(model, dst, external)


_BITS: dict[Method, int] = {"int8-weight-only-nbits": 8, "int4-weight-only-nbits": 4}


def quantize_for_ort(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                     recipe: GraphRecipe, vocab_rows: int) -> None:
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    method = recipe.method
    if method == "int8-dynamic":
        quantize_dynamic_int8(src, dst)
    elif method in _BITS:
        quantize_nbits(src, dst, _BITS[method], recipe.block_size,
                       _BITS[recipe.lm_head] if recipe.lm_head else None, vocab_rows)
    else:
        raise ValueError(f"{method} is not an ONNX Runtime CPU method")
