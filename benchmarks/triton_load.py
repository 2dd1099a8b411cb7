"""Load figures for Triton serving: requests/s and latency p50/p99 at several client counts and
model-instance counts, against the in-process pipeline as the reference.

    python benchmarks/triton_load.py ARTIFACT [--instances 1 2] [--clients 1 2 4]
        [--requests 4] [--max-new-tokens 8] [--threads N] [--json out.json]

For each instance count it writes a repository (hard links to the artifact), starts the bundled
tritonserver (molmo_triton.server; the server environment is .venv-triton), sends one warm-up
request, then for each client count runs that many HTTP clients sending --requests identical
requests in all, back to back (each client ceil(requests / clients)) (greedy, the bundled photo downscaled so the image is 2 crops).
The reference: the same request with MolmoPipeline in this process, before the first server
and after the last (the two runs show the drift of a shared machine). Load averages are read
before and after every configuration.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from molmo_bench.machine import load_average, machine_info
from molmo_bench.measure import percentiles
from molmo_runtime.pipeline import MolmoPipeline
from molmo_triton.client import MolmoTritonClient
from molmo_triton.repository import ModelOptions, write_model
from molmo_triton.server import Distribution, TritonServer

PHOTO = Path(__file__).resolve().parents[1] / "runtime" / "molmo_runtime" / "assets" / "demo.jpg"
PROMPT = "Point to the cat."


def small_photo(width: int = 320) -> bytes:
    """The bundled photo downscaled: Molmo tiles an image this small as 1 crop + the global."""
    from PIL import Image

    image = Image.open(PHOTO)
    image = image.resize((width, round(image.height * width / image.width)))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def direct(artifact: Path, image: bytes, requests: int, max_new_tokens: int,
           threads: int | None) -> dict[str, Any]:
    pipe = MolmoPipeline.from_dir(artifact, threads=threads, verify="size")
    pipe.generate(image, PROMPT, max_new_tokens=max_new_tokens)  # warm-up
    latencies = []
    start = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        pipe.generate(image, PROMPT, max_new_tokens=max_new_tokens)
        latencies.append((time.perf_counter() - t) * 1000.0)
    wall = time.perf_counter() - start
    return {"requests": requests, "req_per_s": requests / wall, **percentiles(latencies)}


def load_run(url: str, image: bytes, clients: int, requests: int,
             max_new_tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        client = MolmoTritonClient(url, "http")
        try:
            for _ in range(requests):
                t = time.perf_counter()
                client.generate(image, PROMPT, max_new_tokens=max_new_tokens)
                with lock:
                    latencies.append((time.perf_counter() - t) * 1000.0)
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(repr(e))
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[:3]}")
    return {"clients": clients, "requests": len(latencies),
            "req_per_s": len(latencies) / wall, **percentiles(latencies)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--requests", type=int, default=8,
                   help="requests per configuration, spread over its clients")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=None,
                   help="ORT threads per instance and for the reference (default: ORT's)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    image = small_photo()
    dist = Distribution.find()
    report: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": machine_info(), "artifact": str(args.artifact), "rows": []}

    def row(kind: str, instances: int | None, result: dict[str, Any], load0: Any) -> None:
        entry = {"kind": kind, "instances": instances, **result,
                 "load_before": load0, "load_after": load_average()}
        report["rows"].append(entry)
        print(f"{kind:8} inst={instances or '-'} clients={result.get('clients', 1)} "
              f"n={result['requests']:3} {result['req_per_s']:.3f} req/s "
              f"p50 {result['p50_ms']:.0f} ms p99 {result['p99_ms']:.0f} ms "
              f"load {entry['load_before']} -> {entry['load_after']}", flush=True)

    load0 = load_average()
    row("direct", None, direct(args.artifact, image, args.requests, args.max_new_tokens,
                               args.threads), load0)
    with tempfile.TemporaryDirectory(prefix="molmo-triton-bench-") as tmp:
        for instances in args.instances:
            repo = Path(tmp) / f"repo-{instances}"
            write_model(args.artifact, repo, ModelOptions(
                instances=instances, threads=args.threads, execution_env=str(dist.env)),
                link=True)
            with TritonServer(repo, dist=dist) as server:
                MolmoTritonClient(server.http_url).generate(image, PROMPT,
                                                            max_new_tokens=args.max_new_tokens)
                for clients in args.clients:
                    load0 = load_average()
                    per_client = -(-args.requests // clients)
                    row("triton", instances, load_run(server.http_url, image, clients,
                                                      per_client, args.max_new_tokens), load0)
    load0 = load_average()
    row("direct", None, direct(args.artifact, image, args.requests, args.max_new_tokens,
                               args.threads), load0)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"{report['date_utc']} · {m['cpu']} · {m['logical_cores']} logical cores · "
             f"{m['memory_gb']} GB · onnxruntime {m['libraries'].get('onnxruntime', '?')} · "
             f"`{report['command']}`", "",
             "| server | instances | clients | requests | req/s | p50 ms | p99 ms | "
             "load avg (1 min) before → after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        server = "Triton (HTTP)" if r["kind"] == "triton" else "in-process pipeline"
        lines.append(f"| {server} | {r['instances'] or '-'} | {r.get('clients', 1)} | "
                     f"{r['requests']} | {r['req_per_s']:.3f} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['load_before'][0]} → {r['load_after'][0]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
