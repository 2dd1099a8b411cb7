"""`molmo-triton-repo` (artifact -> Triton model repository) and `molmo-triton-serve` (run the
bundled tritonserver on a repository, on 127.0.0.1). Thin views over write_model / TritonServer."""

from __future__ import annotations

import argparse
import signal
import sys

from molmo_runtime.errors import MolmoError


def main_repo(argv: list[str] | None = None) -> int:
    from molmo_triton.repository import ModelOptions

    d = ModelOptions()
    p = argparse.ArgumentParser(
        prog="molmo-triton-repo",
        description="Turn a molmo-export artifact into a model of a Triton Inference Server "
                    "repository (Python backend; ONNX Runtime or TensorRT as the artifact says). "
                    "The artifact is copied into the repository and verified.")
    p.add_argument("artifact", help="artifact directory (molmo-export --out)")
    p.add_argument("--out", required=True, help="model repository folder (created if absent; "
                   "other models in it are left alone)")
    p.add_argument("--name", default=d.name, help=f"model name (default: {d.name})")
    p.add_argument("--instances", type=int, default=d.instances,
                   help="model instances, each a process with its own pipeline (default: 1)")
    p.add_argument("--kind", choices=("cpu", "gpu"), default=d.kind,
                   help="KIND_CPU or KIND_GPU instances (default: cpu)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="> 0 turns on Triton's dynamic batcher; the rows of a batch are "
                        "generated one after another (default: 0, off)")
    p.add_argument("--max-queue-delay-us", type=int, default=d.max_queue_delay_us,
                   help="dynamic batcher: how long to wait for a batch to fill (default: 0)")
    p.add_argument("--stream", dest="decoupled", action="store_true",
                   help="decoupled model: stream the answer piece by piece (gRPC streaming)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads per instance (default: ORT's choice)")
    p.add_argument("--max-new-tokens", dest="default_max_new_tokens", type=int,
                   default=d.default_max_new_tokens,
                   help="default when a request does not say (default: 200)")
    p.add_argument("--execution-env", default=None,
                   help="EXECUTION_ENV_PATH: the Python environment (a venv/conda folder with "
                        "bin/activate, or a conda-pack tarball) that has molmo-export installed;"
                        " may start with $$TRITON_MODEL_DIRECTORY. Omit when the server's own "
                        "Python has it (a custom Triton container image)")
    p.add_argument("--link", action="store_true",
                   help="hard-link the artifact's files instead of copying where possible")
    p.add_argument("--force", action="store_true",
                   help="replace REPO/NAME if molmo-triton-repo wrote it")
    args = p.parse_args(argv)
    try:
        from molmo_triton.repository import write_model

        options = ModelOptions(name=args.name, instances=args.instances, kind=args.kind,
                               max_batch_size=args.max_batch_size,
                               max_queue_delay_us=args.max_queue_delay_us,
                               decoupled=args.decoupled, threads=args.threads,
                               default_max_new_tokens=args.default_max_new_tokens,
                               execution_env=args.execution_env)
        path = write_model(args.artifact, args.out, options, force=args.force, link=args.link)
    except MolmoError as e:
        print(f"molmo-triton-repo: error: {e}", file=sys.stderr)
        return 2
    print(f"model written to {path}")
    return 0


def main_serve(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="molmo-triton-serve",
        description="Run the tritonserver bundled with nvidia-pytriton on a model repository, "
                    "on 127.0.0.1 with free ports, until Ctrl-C (for local use and tests; "
                    "deploy with NVIDIA's container, see docs/serving.md).")
    p.add_argument("repository")
    p.add_argument("--server-env", default=None,
                   help="the server's Python environment (default: .venv-triton / "
                        "$MOLMO_TRITON_ENV)")
    args = p.parse_args(argv)
    try:
        from molmo_triton.server import Distribution, TritonServer

        dist = Distribution.find(args.server_env) if args.server_env else None
        server = TritonServer(args.repository, dist=dist).start()
    except MolmoError as e:
        print(f"molmo-triton-serve: error: {e}", file=sys.stderr)
        return 2
    print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}",
          flush=True)
    # Blocked only now: the server started above must not inherit a mask that ignores SIGTERM.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    signal.sigwait(stop_signals)
    report = server.stop()
    print(f"stopped (exit code {report.exit_code}{'' if report.clean else ', forced'})")
    return 0 if report.clean else 1
