"""The demo artifact served by a real tritonserver on 127.0.0.1 (nvidia-pytriton's binary,
Python backend), called with tritonclient over HTTP and gRPC.

One server for the module, with three models: `molmo` (2 instances), `molmo_stream`
(decoupled) and `molmo_batched` (Triton's dynamic batcher). The last test stops it and
checks that nothing is left behind.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from molmo_runtime.pipeline import MolmoPipeline
from molmo_triton.client import Answer, MolmoTritonClient, TritonRequestError
from molmo_triton.repository import ModelOptions, write_model
from molmo_triton.server import Distribution, TritonServer
from tests.conftest import REPO

PHOTO = REPO / "runtime" / "molmo_runtime" / "assets" / "demo.jpg"
IMAGE = PHOTO.read_bytes()

# (image?, prompt, settings): distinct requests, each with its own expected answer.
REQUESTS: list[tuple[bool, str, dict[str, Any]]] = [
    (True, "Point to the cat.", {"max_new_tokens": 12}),
    (True, "Describe this image.", {"max_new_tokens": 10, "temperature": 0.8, "top_k": 20,
                                    "seed": 3}),
    (False, "Tell me a story.", {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9,
                                 "seed": 7}),
    (False, "Count to ten.", {"max_new_tokens": 12}),
]


@pytest.fixture(scope="module")
def server(triton_dist: Distribution, demo_artifact: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("triton-repo")
    env = str(triton_dist.env)
    write_model(demo_artifact, repo, ModelOptions(name="molmo", instances=2, execution_env=env),
                link=True)
    write_model(demo_artifact, repo, ModelOptions(name="molmo_stream", decoupled=True,
                                                  execution_env=env), link=True)
    write_model(demo_artifact, repo, ModelOptions(name="molmo_batched", max_batch_size=4,
                                                  max_queue_delay_us=100_000,
                                                  execution_env=env), link=True)
    before = _python_env_dirs()
    srv = TritonServer(repo, dist=triton_dist).start()
    srv.python_env_dirs_before = before  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def _python_env_dirs() -> set[Path]:
    """The Python backend's scratch folders (/tmp/python_env_XXXXXX, one per server)."""
    return set(Path("/tmp").glob("python_env_*"))


def _client(server: TritonServer, protocol: str, model: str = "molmo") -> MolmoTritonClient:
    url = server.http_url if protocol == "http" else server.grpc_url
    return MolmoTritonClient(url, protocol, model)  # type: ignore[arg-type]


def _ask(client: MolmoTritonClient, request: tuple[bool, str, dict[str, Any]]) -> Answer:
    with_image, prompt, settings = request
    return client.generate(IMAGE if with_image else None, prompt, **settings)


@functools.cache
def _molmo_run(artifact: Path, index: int) -> dict[str, Any]:
    """molmo-run --json's answer to REQUESTS[index] (run once per test session)."""
    with_image, prompt, settings = REQUESTS[index]
    cmd = [sys.executable, "-m", "molmo_runtime.cli", str(artifact), "--prompt", prompt, "--json"]
    if with_image:
        cmd += ["--image", str(PHOTO)]
    for key, value in settings.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_equal_molmo_run(server: TritonServer, demo_artifact: Path,
                                 protocol: str) -> None:
    client = _client(server, protocol)
    for i, request in enumerate(REQUESTS):
        expected = _molmo_run(demo_artifact, i)
        answer = _ask(client, request)
        assert expected["text"] and answer.text == expected["text"], request
        assert answer.points == expected["points"], request
        assert answer.finish_reason == expected["finish_reason"], request
        assert answer.generated_tokens == len(expected["token_ids"]), request
        assert answer.prompt_tokens == expected["timings"]["prompt_tokens"], request
    client.close()


def test_stop_strings_are_applied(server: TritonServer, demo_artifact: Path) -> None:
    full = _molmo_run(demo_artifact, 3)["text"]
    if len(full) < 6:
        pytest.skip("the demo model's greedy answer is too short to cut")
    client = _client(server, "grpc")
    cut = client.generate(None, REQUESTS[3][1], stop=[full[3:5], "never-appears"],
                          **REQUESTS[3][2])
    assert (cut.text, cut.finish_reason) == (full[: full.find(full[3:5])], "stop")


def test_streaming_pieces_add_up_to_the_answer(server: TritonServer) -> None:
    whole = _ask(_client(server, "grpc"), REQUESTS[0])
    pieces = list(_client(server, "grpc", "molmo_stream").stream(IMAGE, REQUESTS[0][1],
                                                                  **REQUESTS[0][2]))
    assert len(pieces) >= 2 and all(not p.finish_reason for p in pieces[:-1])
    final = pieces[-1]
    assert "".join(p.text for p in pieces) == whole.text
    assert (final.points, final.finish_reason, final.generated_tokens) == (
        whole.points, whole.finish_reason, whole.generated_tokens)


@pytest.fixture(scope="module")
def local_pipe(demo_artifact: Path) -> MolmoPipeline:
    return MolmoPipeline.from_dir(demo_artifact, backend="ort")


BAD_REQUESTS = [  # corrupt images, an over-long request, bad settings
    (IMAGE[: len(IMAGE) // 3], "Point to the cat.", {}),
    (b"not an image at all", "Point to the cat.", {}),
    (IMAGE, "Describe this image.", {"max_new_tokens": 100_000}),
    (None, "Hi", {"temperature": -1.0}),
    (None, "Hi", {"top_p": 1.5}),
    (None, "Hi", {"top_k": 0}),
]


BAD_INPUT_STATUS = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_inputs_come_back_as_errors_and_the_server_keeps_serving(
        server: TritonServer, local_pipe: MolmoPipeline, protocol: str) -> None:
    client = _client(server, protocol)
    good = _ask(client, REQUESTS[3])
    for image, prompt, settings in BAD_REQUESTS:
        # The message the runtime gives for this input in-process ...
        with pytest.raises(ValueError) as local:  # InputError is a ValueError
            local_pipe.generate(image, prompt, **settings)
        # ... is the message the Triton client gets.
        with pytest.raises(TritonRequestError) as remote:
            client.generate(image, prompt, **settings)
        assert str(local.value) and str(local.value) in str(remote.value), settings
        assert remote.value.status == BAD_INPUT_STATUS[protocol], remote.value.status
        assert _ask(client, REQUESTS[3]) == good  # still serving, same answer
    client.close()


def test_four_concurrent_clients_get_their_single_client_answers(server: TritonServer) -> None:
    single = [_ask(_client(server, "http"), r) for r in REQUESTS]
    answers: dict[tuple[int, int], Answer] = {}
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        client = _client(server, "http" if w % 2 == 0 else "grpc")
        try:
            for i in range(10):
                answers[w, i] = _ask(client, REQUESTS[(w + i) % len(REQUESTS)])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(answers) == 40
    for (w, i), answer in answers.items():
        assert answer == single[(w + i) % len(REQUESTS)], (w, i)


def test_dynamically_batched_requests_get_their_own_answers(server: TritonServer) -> None:
    single = [_ask(_client(server, "grpc"), r) for r in REQUESTS]
    answers: dict[int, Answer] = {}

    def worker(i: int) -> None:  # concurrent, so the batcher can group them
        client = MolmoTritonClient(server.grpc_url, "grpc", "molmo_batched", batched=True)
        answers[i] = _ask(client, REQUESTS[i])
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert [answers.get(i) for i in range(len(REQUESTS))] == single


def test_metrics_for_autoscaling_are_exported(server: TritonServer) -> None:
    """The metric names docs/serving.md builds autoscaling on, read from this server."""
    import urllib.request

    _ask(_client(server, "http"), REQUESTS[3])
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    for name in ("nv_inference_pending_request_count", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us", "nv_inference_request_success",
                 "nv_inference_request_failure", "nv_inference_count"):
        assert re.search(rf'^{name}{{[^}}]*model="molmo"', text, re.MULTILINE), name


def test_zz_server_stops_cleanly(server: TritonServer) -> None:
    """Last in this module: SIGTERM stops the server and its stubs; nothing is left behind."""
    parent = psutil.Process(server.process.pid)  # type: ignore[union-attr]
    stubs = [p for p in parent.children(recursive=True)
             if "triton_python_backend_stub" in " ".join(p.cmdline())]
    assert len(stubs) == 4  # molmo x2, molmo_stream, molmo_batched: the check below can fail
    new_env_dirs = _python_env_dirs() - server.python_env_dirs_before  # type: ignore[attr-defined]
    assert new_env_dirs, "the Python backend made no scratch folder: check the glob"
    workspace = server.workspace
    report = server.stop()
    assert report.clean, (report, server.log_tail())
    assert not parent.is_running()
    assert not [p.pid for p in stubs if p.is_running()]
    assert workspace is not None and not workspace.exists()
    assert not (new_env_dirs & _python_env_dirs())
