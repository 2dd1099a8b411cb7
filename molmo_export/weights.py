"""Lazy, per-tensor access to a checkpoint's weights under OUR parameter names.

    weights = CheckpointWeights(checkpoint_dir)            # reads headers only
    w = weights.get("language_model.model.layers.3.attn.wq.weight", torch.float32)

Nothing is loaded up front: `get` opens the safetensors file(s) holding the official tensor(s)
behind one of our parameters (molmo_export.checkpoint's name table: the one source of truth for
names, fused-tensor splits and the embedding rows), reads just those, assembles the parameter
and converts its dtype on the way. Peak memory is one parameter (plus the official tensor it is
cut from, e.g. a fused QKV). The streaming exporter (molmo_export.export.streaming) builds its
graphs' initializers from this, one tensor at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from molmo_export.checkpoint import PlanEntry, Write, _open, scan_checkpoint
from molmo_export.config import CheckpointError, MolmoConfig, config_from_checkpoint

if TYPE_CHECKING:
    import torch


def parameter_shapes(cfg: MolmoConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape, from a model built on the meta device (no memory)."""
    import torch

    from molmo_export.model import MolmoForConditionalGeneration

    with torch.device("meta"):
        model = MolmoForConditionalGeneration(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


class CheckpointWeights:
    """Our parameters, read one at a time from an official checkpoint folder."""

    def __init__(self, directory: str | os.PathLike[str], cfg: MolmoConfig | None = None) -> None:
        self.directory = Path(directory)
        self.config = cfg or config_from_checkpoint(self.directory)
        self.shapes = parameter_shapes(self.config)
        report, self._location, plan = scan_checkpoint(self.directory, self.config, self.shapes)
        if not report.ok:
            raise CheckpointError(f"cannot read {self.directory}: the tensors do not match a "
                                  f"{self.config.name} model built from its config.json\n"
                                  f"{report.summary()}")
        self.report = report
        # our parameter -> the (official entry, write) pairs that fill it
        self._sources: dict[str, list[tuple[PlanEntry, Write]]] = {}
        for entry in plan.values():
            for w in entry.writes:
                self._sources.setdefault(w.param, []).append((entry, w))

    def names(self) -> list[str]:
        return list(self.shapes)

    def nbytes(self, name: str, itemsize: int = 4) -> int:
        n = itemsize
        for d in self.shapes[name]:
            n *= d
        return n

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Parameter `name` as a CPU tensor of `dtype` (None: the checkpoint's own dtype for a
        parameter cut from one official tensor, float32 for one assembled from several)."""
        import torch

        sources = self._sources.get(name)
        if sources is None:
            raise KeyError(f"{name} is not a parameter of {self.config.name}")
        if len(sources) == 1 and sources[0][1].index is None:  # one official tensor (or rows)
            entry, w = sources[0]
            tensor = self._read(entry.official, w.src_rows)
            return tensor if dtype is None else tensor.to(dtype).contiguous()
        dtype = dtype or torch.float32
        out = torch.empty(self.shapes[name], dtype=dtype)
        for entry, w in sources:
            src = self._read(entry.official, w.src_rows)
            dst = out
            if isinstance(w.index, tuple):
                dst = out[w.index[0]:w.index[1]]
            elif isinstance(w.index, int):
                dst = out[w.index]
            dst.copy_(src)
            del src
        return out

    def rows(self, name: str, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Rows [r0, r1) of parameter `name` as `dtype`, reading only those rows of the official
        tensor(s) (the LM head, or the embeddings assembled from two official tensors); None for
        a parameter not assembled by rows (a fused split, an expert stack)."""
        import torch

        sources = self._sources.get(name)
        if sources is None:
            raise KeyError(f"{name} is not a parameter of {self.config.name}")
        if any(isinstance(w.index, int) or (w.index is None and len(sources) > 1)
               for _, w in sources):
            return None
        out = torch.empty((r1 - r0, *self.shapes[name][1:]), dtype=dtype)
        for entry, w in sources:
            lo, hi = w.index if isinstance(w.index, tuple) else (0, self.shapes[name][0])
            a, b = max(lo, r0), min(hi, r1)
            if a >= b:
                continue
            first = (w.src_rows[0] if w.src_rows else 0) + a - lo  # in the official tensor
            out[a - r0:b - r0].copy_(self._read(entry.official, (first, first + b - a)))
        return out

    def _read(self, official: str, rows: tuple[int, int] | None) -> torch.Tensor:
        from safetensors import SafetensorError

        path = self._location[official]
        try:
            with _open(path) as f:
                if rows is None:
                    return f.get_tensor(official)
                return f.get_slice(official)[rows[0]:rows[1]]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {official} ({e}); the file is "
                                  "corrupt: download it again") from None
