"""The Molmo model's Triton inputs and outputs: one table read by the config writer, the
Python-backend model and the client.

Every tensor has one element per request (`dims: [1]`, plus Triton's batch axis when the
repository is written with a max batch size), except STOP, which holds any number of stop
strings. Strings travel as Triton BYTES (`TYPE_STRING` in config.pbtxt).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str  # the config.pbtxt data_type without its TYPE_ prefix
    optional: bool = False
    variable: bool = False  # dims [-1] instead of [1]

    @property
    def wire_type(self) -> str:
        """The datatype name the HTTP/gRPC protocol (and tritonclient) uses."""
        return {"STRING": "BYTES"}.get(self.triton_type, self.triton_type)


# Generation settings: input name -> (TensorSpec, keyword of MolmoPipeline.generate).
SETTINGS = {
    "MAX_NEW_TOKENS": (TensorSpec("MAX_NEW_TOKENS", "INT32", optional=True), "max_new_tokens"),
    "TEMPERATURE": (TensorSpec("TEMPERATURE", "FP64", optional=True), "temperature"),
    "TOP_K": (TensorSpec("TOP_K", "INT32", optional=True), "top_k"),
    "TOP_P": (TensorSpec("TOP_P", "FP64", optional=True), "top_p"),
    "SEED": (TensorSpec("SEED", "INT64", optional=True), "seed"),
}

INPUTS = (
    TensorSpec("IMAGE", "STRING", optional=True),  # encoded image file bytes (JPEG, PNG, ...)
    TensorSpec("PROMPT", "STRING"),
    *(spec for spec, _ in SETTINGS.values()),
    TensorSpec("STOP", "STRING", optional=True, variable=True),
)

OUTPUTS = (
    TensorSpec("TEXT", "STRING"),            # the answer; in streaming mode, the next piece
    TensorSpec("POINTS", "STRING"),          # JSON list of {"x", "y", "label"} in image pixels
    TensorSpec("FINISH_REASON", "STRING"),   # "eos" | "stop" | "length"; "" while streaming
    TensorSpec("PROMPT_TOKENS", "INT32"),    # image tokens included
    TensorSpec("GENERATED_TOKENS", "INT32"),
)
