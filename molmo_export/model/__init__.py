"""The PyTorch reference Molmo (spec §2-§5): one readable file per component.

    vision.py      MolmoVisionModel       images -> multi-layer ViT features
    connector.py   MolmoConnector         features + image masks -> image tokens
    text.py        MolmoTextModel, MolmoForCausalLM (+ 7B-O post-norm/QK-norm variant)
    text_moe.py    MolmoE's mixture-of-experts feed-forward
    molmo.py       MolmoForConditionalGeneration (embedding + image tokens, forward, generate)
    generation.py  KV-cached generation and sampling
"""

from molmo_export.model.connector import MolmoConnector
from molmo_export.model.molmo import MolmoForConditionalGeneration, MolmoOutput
from molmo_export.model.text import MolmoForCausalLM, MolmoTextModel
from molmo_export.model.vision import MolmoVisionModel

__all__ = ["MolmoConnector", "MolmoForCausalLM", "MolmoForConditionalGeneration", "MolmoOutput",
           "MolmoTextModel", "MolmoVisionModel"]
