"""Weights one tensor at a time, by our parameter name: `get(name) -> np.ndarray` (float32).

The graph builders that write weights themselves (export/ort_decoder.py) take any object with
this one method, so a lazy checkpoint reader can be swapped in without touching them. The names
are those of MolmoForConditionalGeneration's parameters; which official tensor (and which rows
of it) fills each one comes from checkpoint.py's name table, the one source of truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from molmo_export.checkpoint import PlanEntry, Write, _open, build_plan, weight_files
from molmo_export.config import CheckpointError, MolmoConfig, config_from_checkpoint


class TensorSource(Protocol):
    config: MolmoConfig

    def get(self, name: str) -> np.ndarray:
        """The parameter `name` as a float32 array (a fresh array; the caller may drop it)."""
        ...


def _param_shapes(cfg: MolmoConfig) -> dict[str, tuple[int, ...]]:
    import torch

    from molmo_export.model import MolmoForConditionalGeneration

    with torch.device("meta"):
        model = MolmoForConditionalGeneration(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


class CheckpointTensors:
    """Reads parameters straight from a checkpoint folder's safetensors, one at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.config = config_from_checkpoint(self.directory)
        plan, _ = build_plan(self.config, _param_shapes(self.config))
        self._parts: dict[str, list[tuple[PlanEntry, Write]]] = {}
        for entry in plan.values():
            for w in entry.writes:
                self._parts.setdefault(w.param, []).append((entry, w))
        self._file: dict[str, Path] = {}
        for path in weight_files(self.directory):
            with _open(path) as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    self._file[key] = path

    def get(self, name: str) -> np.ndarray:
        if name not in self._parts:
            raise CheckpointError(f"no checkpoint tensor fills parameter {name}")
        parts = self._parts[name]
        if any(isinstance(w.index, int) for _, w in parts):  # MoE experts: one per index
            raise CheckpointError(f"{name} is stacked from per-expert tensors")
        # a whole tensor, rows of a fused one (q|k|v), or row ranges (the embedding's parts)
        parts = sorted(parts, key=lambda p: p[1].index[0] if isinstance(p[1].index, tuple)
                       else 0)
        arrays = [self._read(entry, w) for entry, w in parts]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)

    def _read(self, entry: PlanEntry, write: Write) -> np.ndarray:
        if entry.official not in self._file:
            raise CheckpointError(f"{self.directory}: tensor {entry.official} is missing")
        with _open(self._file[entry.official]) as f:
            part = f.get_slice(entry.official)
            rows = write.src_rows
            tensor = part[rows[0]:rows[1]] if rows is not None else part[:]
        return tensor.float().numpy()  # safetensors opened for torch: bf16 checkpoints too
