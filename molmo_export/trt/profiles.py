"""TensorRT optimization profiles from the manifest, as plain data. Torch-free, TensorRT-free.

One profile per shape regime of each graph:

    vision_encoder, connector   crops 1 .. max_crops + 1 (opt: all of them; Molmo's tiling fills
                                the crop budget for ordinary photos)
    decoder  profile 0 prefill  seq 1 .. max_prompt_len, total seq .. max_seq_len (past 0 for a
                                first prompt; later turns / chunked prefill have past > 0)
             profile 1 decode   seq 1, total 1 .. max_seq_len
    every past_key_values.*     cache = max_seq_len, fixed: the runtime binds its whole
                                preallocated cache (graph_io's KV convention)

A profile is computed as dimension ranges (`DimRange` per named dimension), then expanded into
(min, opt, max) shapes for every input tensor of the graph spec, so `total` (an input dimension
of attention_mask only) is constrained consistently. `apply_profiles` is the thin TensorRT step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from molmo_runtime.errors import InputError
from molmo_runtime.graph_io import CONNECTOR, DECODER, VISION_ENCODER, GraphDims, GraphSpec
from molmo_runtime.trt_buffers import Profile, ShapeRange

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InputError(f"invalid profile range min={self.min} opt={self.opt} "
                             f"max={self.max}: need 1 <= min <= opt <= max")

    @classmethod
    def fixed(cls, n: int) -> DimRange:
        return cls(n, n, n)


@dataclass(frozen=True)
class ProfileSettings:
    """Knobs of the profiles; None = derived from the manifest (see module docstring)."""

    max_batch: int = 1
    opt_batch: int = 1
    opt_crops: int | None = None  # default: max_crops + 1
    max_prompt_len: int | None = None  # default: max_seq_len
    opt_prompt_len: int | None = None  # default: max_prompt_len
    opt_decode_total: int | None = None  # default: max_seq_len // 2

    def __post_init__(self) -> None:
        # The rest is checked against the manifest's dims (graph_ranges); this one is a CLI
        # flag, refused before any export work.
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise InputError(f"max_prompt_len={self.max_prompt_len}: need >= 1")


@dataclass(frozen=True)
class NamedProfile:
    name: str
    shapes: Profile = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name,
                "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def expand(spec: GraphSpec, ranges: dict[str, DimRange]) -> Profile:
    """(min, opt, max) shape of every input of `spec`, taking named dims from `ranges`."""
    out: Profile = {}
    for t in spec.inputs:
        missing = [d for d in t.dims if isinstance(d, str) and d not in ranges]
        if missing:
            raise InputError(f"{spec.name}: no profile range for dimension(s) {missing} of "
                             f"{t.name}; the manifest's graph I/O is not what this builder knows")
        triple: ShapeRange = tuple(  # type: ignore[assignment]
            tuple(d if isinstance(d, int) else getattr(ranges[d], which) for d in t.dims)
            for which in ("min", "opt", "max"))
        out[t.name] = triple
    return out


def graph_ranges(graph: str, dims: GraphDims, settings: ProfileSettings = ProfileSettings()
                 ) -> list[tuple[str, dict[str, DimRange]]]:
    """Named dimension ranges of each profile of one graph."""
    if graph in (VISION_ENCODER, CONNECTOR):
        max_crops = dims.max_crops + 1
        opt = max_crops if settings.opt_crops is None else settings.opt_crops
        if not 1 <= opt <= max_crops:
            raise InputError(f"opt_crops={opt} is outside 1..{max_crops} (max_crops + 1)")
        return [("crops", {"crops": DimRange(1, opt, max_crops)})]
    if graph != DECODER:
        raise InputError(f"no optimization profiles defined for graph {graph!r}")
    s = dims.max_seq_len
    max_prompt = s if settings.max_prompt_len is None else settings.max_prompt_len
    if not 1 <= max_prompt <= s:
        raise InputError(f"max_prompt_len={max_prompt} is outside 1..{s} (max_seq_len)")
    opt_prompt = max_prompt if settings.opt_prompt_len is None else settings.opt_prompt_len
    opt_total = max(1, s // 2) if settings.opt_decode_total is None else settings.opt_decode_total
    batch = DimRange(1, settings.opt_batch, settings.max_batch)
    cache = DimRange.fixed(s)
    prefill = {"batch": batch, "seq": DimRange(1, opt_prompt, max_prompt),
               "total": DimRange(1, opt_prompt, s), "cache": cache}
    decode = {"batch": batch, "seq": DimRange.fixed(1), "total": DimRange(1, opt_total, s),
              "cache": cache}
    return [("prefill", prefill), ("decode", decode)]


def graph_profiles(spec: GraphSpec, dims: GraphDims,
                   settings: ProfileSettings = ProfileSettings()) -> list[NamedProfile]:
    return [NamedProfile(name, expand(spec, ranges))
            for name, ranges in graph_ranges(spec.name, dims, settings)]


def all_profiles(graphs: dict[str, GraphSpec], dims: GraphDims,
                 settings: ProfileSettings = ProfileSettings()) -> dict[str, list[NamedProfile]]:
    """Profiles of every graph of a manifest (`Manifest.graphs`, `Manifest.dims`)."""
    return {name: graph_profiles(spec, dims, settings) for name, spec in graphs.items()}


def apply_profiles(builder: trt.Builder, config: trt.IBuilderConfig,
                   profiles: list[NamedProfile]) -> None:
    """Add the profiles to a builder config, in order (index = position in the list)."""
    import tensorrt as trt

    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        index = config.add_optimization_profile(prof)
        if index < 0:
            raise InputError(f"TensorRT rejected optimization profile {p.name!r}: {p.shapes}")
