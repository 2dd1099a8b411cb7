"""Weights one tensor at a time, by our parameter name: `get(name) -> np.ndarray` (float32).

The graph builders that write weights themselves (export/ort_decoder.py) take any object with
these methods (`rows` lets them quantize a big weight block by block, never holding it whole),
so a lazy checkpoint reader can be swapped in without touching them. The names
are those of MolmoForConditionalGeneration's parameters; which official tensor (and which rows
of it) fills each one comes from checkpoint.py's name table, the one source of truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from molmo_export.config import CheckpointError, MolmoConfig
from molmo_export.weights import CheckpointWeights


class TensorSource(Protocol):
    config: MolmoConfig

    def get(self, name: str) -> np.ndarray:
        """The parameter `name` as a float32 array (a fresh array; the caller may drop it)."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        ...

    def rows(self, name: str, r0: int, r1: int) -> np.ndarray | None:
        """Rows [r0, r1) of `name` as float32, reading only those (None: not readable by rows;
        the caller gets it whole)."""
        ...


class CheckpointTensors:
    """A TensorSource over a checkpoint folder: molmo_export.weights' lazy reader, as float32."""

    def __init__(self, directory: str | Path) -> None:
        self._weights = CheckpointWeights(directory)
        self.directory = self._weights.directory
        self.config = self._weights.config

    def get(self, name: str) -> np.ndarray:
        import torch

        try:
            return self._weights.get(name, torch.float32).numpy()
        except KeyError:
            raise CheckpointError(f"no checkpoint tensor fills parameter {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._weights.shapes[name])

    def rows(self, name: str, r0: int, r1: int) -> np.ndarray | None:
        import torch

        block = self._weights.rows(name, r0, r1, torch.float32)
        return None if block is None else block.numpy()
