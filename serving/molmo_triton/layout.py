"""Where things are inside one model folder of the repository (shared by the writer and the
model Triton loads)."""

from __future__ import annotations

VERSION = "1"                      # Triton's version folder
ARTIFACT_DIRNAME = "artifact"      # the artifact's copy, beside model.py in the version folder
MARKER = ".molmo-triton-model"     # marks a model folder molmo-triton-repo wrote (and may replace)

# The version folder's model.py: Triton's stub imports it and looks up TritonPythonModel.
MODEL_PY = '''"""Triton Python-backend entry point, written by molmo-triton-repo.

The model is molmo_triton.backend_model.TritonPythonModel: the Python environment the server
runs this in needs molmo-export installed (pip install 'molmo-export[ort]', or [trt] on a GPU).
"""

from molmo_triton.backend_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
'''
