"""A small tritonclient wrapper for the Molmo model (used by the tests and the load benchmark;
also what a user's client looks like). Needs `pip install 'tritonclient[http,grpc]'`.

    client = MolmoTritonClient("127.0.0.1:8000")                  # or protocol="grpc", :8001
    answer = client.generate(Path("cat.jpg").read_bytes(), "Point to the cat.")
    answer.text, answer.points, answer.finish_reason
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from molmo_runtime.errors import MolmoError, require
from molmo_triton.tensors import INPUTS, SETTINGS

Protocol = Literal["http", "grpc"]
_NUMPY = {"INT32": np.int32, "INT64": np.int64, "FP64": np.float64, "BYTES": np.object_}
_SPECS = {spec.name: spec for spec in INPUTS}
_SETTING_NAME = {key: name for name, (_, key) in SETTINGS.items()}


class TritonRequestError(MolmoError):
    """The server answered with an error (its message is the model's); `status` is the
    protocol's code as tritonclient reports it ("400", "StatusCode.INVALID_ARGUMENT", ...)."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Answer:
    text: str
    points: list[dict[str, Any]]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int


def _module(protocol: Protocol) -> Any:
    if protocol not in ("http", "grpc"):
        raise MolmoError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return require(f"tritonclient.{protocol}", "triton-client", "talking to Triton")


def build_inputs(protocol: Protocol, image: bytes | None, prompt: str,
                 stop: list[str] | tuple[str, ...] = (), batched: bool = False,
                 **settings: Any) -> list[Any]:
    """InferInputs for one request; settings are MolmoPipeline.generate's keywords
    (max_new_tokens, temperature, top_k, top_p, seed); None leaves one at its default.
    `batched`: the model was written with a max batch size (inputs get a batch axis of 1)."""
    tc = _module(protocol)
    values: dict[str, list[Any]] = {"PROMPT": [prompt.encode()]}
    if image is not None:
        values["IMAGE"] = [bytes(image)]
    if stop:
        values["STOP"] = [s.encode() for s in stop]
    for key, value in settings.items():
        if key not in _SETTING_NAME:
            raise MolmoError(f"unknown generation setting {key!r}; use one of "
                             f"{', '.join(_SETTING_NAME)}, stop")
        if value is not None:
            values[_SETTING_NAME[key]] = [value]
    inputs = []
    for name, data in values.items():
        wire = _SPECS[name].wire_type
        array = np.array(data, dtype=_NUMPY[wire])
        if batched:
            array = array[None]
        infer_input = tc.InferInput(name, list(array.shape), wire)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def read_answer(result: Any) -> Answer:
    def one(name: str) -> Any:
        return result.as_numpy(name).reshape(-1)[0]

    return Answer(text=one("TEXT").decode(), points=json.loads(one("POINTS")),
                  finish_reason=one("FINISH_REASON").decode(),
                  prompt_tokens=int(one("PROMPT_TOKENS")),
                  generated_tokens=int(one("GENERATED_TOKENS")))


class MolmoTritonClient:
    def __init__(self, url: str, protocol: Protocol = "http", model: str = "molmo",
                 timeout_s: float = 600.0, batched: bool = False) -> None:
        self.protocol, self.model, self.batched = protocol, model, batched
        tc = _module(protocol)
        if protocol == "http":
            self.client = tc.InferenceServerClient(url, connection_timeout=timeout_s,
                                                   network_timeout=timeout_s)
        else:
            self.client = tc.InferenceServerClient(url)
        self.timeout_s = timeout_s

    def generate(self, image: bytes | None, prompt: str, **settings: Any) -> Answer:
        inputs = build_inputs(self.protocol, image, prompt, batched=self.batched, **settings)
        exception = require("tritonclient.utils", "triton-client").InferenceServerException
        try:
            if self.protocol == "grpc":
                result = self.client.infer(self.model, inputs, client_timeout=self.timeout_s)
            else:
                result = self.client.infer(self.model, inputs)
        except exception as e:
            raise TritonRequestError(e.message(), e.status()) from e
        return read_answer(result)

    def stream(self, image: bytes | None, prompt: str, **settings: Any) -> Iterator[Answer]:
        """gRPC, streaming (decoupled) model: one Answer per text piece, the last one with
        points, finish reason and token counts."""
        if self.protocol != "grpc":
            raise MolmoError("streaming needs protocol='grpc'")
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            self.client.async_stream_infer(self.model, build_inputs("grpc", image, prompt,
                                                                    **settings))
            while True:
                result, error = responses.get(timeout=self.timeout_s)
                if error is not None:
                    raise TritonRequestError(error.message(), error.status())
                answer = read_answer(result)
                yield answer
                if answer.finish_reason:
                    return
        finally:
            self.client.stop_stream()

    def close(self) -> None:
        self.client.close()
