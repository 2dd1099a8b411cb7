"""Serving Molmo artifacts on NVIDIA Triton Inference Server (torch-free).

    molmo-triton-repo ARTIFACT --out REPO     artifact -> REPO/molmo (config.pbtxt, 1/model.py,
                                              1/artifact/), served by Triton's Python backend
    molmo-triton-serve REPO                   run the bundled tritonserver on 127.0.0.1

Modules: tensors (the model's inputs/outputs), layout (a model folder), repository (the
writer), backend_model (what Triton runs), server (local tritonserver), client (tritonclient).
See docs/serving.md.
"""

from molmo_triton.repository import ModelOptions, write_model

__all__ = ["ModelOptions", "write_model"]
