"""The Python-backend model Triton runs: one MolmoPipeline per model instance.

Triton starts one stub process per instance and imports the repository's `1/model.py`, which
re-exports `TritonPythonModel` from here (so the server's Python environment needs molmo-export
installed). Only that stub process imports this module: `triton_python_backend_utils` exists
nowhere else.

A request's bad input (unreadable image, prompt over the artifact's max_seq_len, bad settings)
becomes an error response carrying the runtime's message; the instance keeps serving.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from molmo_runtime.errors import InputError, MolmoError
from molmo_runtime.pipeline import GenerationResult, MolmoPipeline
from molmo_triton.layout import ARTIFACT_DIRNAME
from molmo_triton.tensors import SETTINGS


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.decoupled = bool(pb_utils.using_decoupled_model_transaction_policy(config))
        self.default_max_new_tokens = int(params.get("DEFAULT_MAX_NEW_TOKENS", "200"))
        threads = int(params["THREADS"]) if params.get("THREADS") else None
        providers = None
        if args["model_instance_kind"] == "GPU":
            # Before anything initialises CUDA in this process: the instance sees only its GPU.
            os.environ["CUDA_VISIBLE_DEVICES"] = args["model_instance_device_id"]
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        artifact = Path(args["model_repository"]) / args["model_version"] / ARTIFACT_DIRNAME
        # Verified at load: every file's size and sha256 against the manifest ("full").
        self.pipe = MolmoPipeline.from_dir(artifact, backend="auto", providers=providers,
                                           threads=threads, verify="full")
        # One token of a text-only prompt: the graphs run before the first request arrives.
        self.pipe.generate(None, "Hello", max_new_tokens=1)
        pb_utils.Logger.log_info(f"molmo: {args['model_instance_name']} serves {artifact} "
                                 f"(target {self.pipe.manifest.target}, "
                                 f"{type(self.pipe.backend).__name__})")

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses = []
        for request in requests:
            try:
                results = [self.pipe.generate(**row) for row in self._rows(request)]
                responses.append(pb_utils.InferenceResponse(self._outputs(results)))
            except Exception as e:  # noqa: BLE001 - every failure becomes this request's error
                responses.append(_error_response(e))
        return responses

    def _stream(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            (row,) = self._rows(request)  # decoupled repositories are written unbatched
            stream = self.pipe.stream(**row)
            for piece in stream:
                sender.send(pb_utils.InferenceResponse(self._outputs(None, piece)))
            final = self._outputs([stream.result], "")
            sender.send(pb_utils.InferenceResponse(final),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # noqa: BLE001
            sender.send(_error_response(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    # -- tensors <-> pipeline arguments -------------------------------------------------------

    def _input(self, request: Any, name: str, rows: int | None) -> np.ndarray | None:
        """The input as [rows, n] (n = 1 except for STOP), or None when the request omits it."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        a: np.ndarray = tensor.as_numpy()
        a = a.reshape(a.shape[0], -1) if self.batched else a.reshape(1, -1)
        if rows is not None and a.shape[0] != rows:
            raise InputError(f"{name} has {a.shape[0]} rows, PROMPT has {rows}")
        return a

    def _rows(self, request: Any) -> list[dict[str, Any]]:
        """One keyword dict for MolmoPipeline.generate per batch row of the request."""
        prompt = self._input(request, "PROMPT", None)
        if prompt is None:
            raise InputError("PROMPT is required")
        n = prompt.shape[0]
        image = self._input(request, "IMAGE", n)
        stop = self._input(request, "STOP", n)
        settings = {key: self._input(request, name, n) for name, (_, key) in SETTINGS.items()}
        rows = []
        for i in range(n):
            row: dict[str, Any] = {"image": None if image is None else bytes(image[i, 0]),
                                   "prompt": _text(prompt[i, 0], "PROMPT"),
                                   "max_new_tokens": self.default_max_new_tokens}
            row.update({key: a[i, 0].item() for key, a in settings.items() if a is not None})
            if stop is not None:
                row["stop"] = [_text(s, "STOP") for s in stop[i]]
            rows.append(row)
        return rows

    def _outputs(self, results: list[GenerationResult] | None, piece: str = "") -> list[Any]:
        """Output tensors for finished results, or (results None) for one streamed piece."""
        if results is None:
            columns: dict[str, list[Any]] = {"TEXT": [piece], "POINTS": ["[]"],
                                             "FINISH_REASON": [""], "PROMPT_TOKENS": [0],
                                             "GENERATED_TOKENS": [0]}
        else:
            columns = {
                "TEXT": [piece if self.decoupled else r.text for r in results],
                "POINTS": [json.dumps([dataclasses.asdict(p) for p in r.points])
                           for r in results],
                "FINISH_REASON": [r.finish_reason for r in results],
                "PROMPT_TOKENS": [r.timings.prompt_tokens for r in results],
                "GENERATED_TOKENS": [len(r.token_ids) for r in results],
            }
        shape = (-1, 1) if self.batched else (-1,)
        return [pb_utils.Tensor(name, _array(values).reshape(shape))
                for name, values in columns.items()]


def _array(values: list[Any]) -> np.ndarray:
    if isinstance(values[0], str):
        return np.array([v.encode() for v in values], dtype=np.object_)
    return np.array(values, dtype=np.int32)


def _text(value: Any, name: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name} is not valid UTF-8 ({e})") from e


def _error_response(e: Exception) -> Any:
    """The request's error: the caller's bad input is INVALID_ARG (HTTP 400), the rest INTERNAL."""
    if isinstance(e, ValueError):  # InputError, and the sampler's checks
        error = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
    elif isinstance(e, MolmoError):
        error = pb_utils.TritonError(str(e), pb_utils.TritonError.INTERNAL)
    else:  # a bug, not the caller's input: say so, and leave the traceback in the server log
        pb_utils.Logger.log_error(traceback.format_exc())
        error = pb_utils.TritonError(f"internal error ({type(e).__name__}): {e}",
                                     pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=error)

