"""TritonServer: run the `tritonserver` that the nvidia-pytriton wheel bundles, on 127.0.0.1,
for tests, benchmarks and local use (production runs NVIDIA's container: docs/serving.md).

The server's Python environment (SERVER_ENV, `.venv-triton` from `make .venv-triton/.installed`)
holds nvidia-pytriton (which pins numpy<2, hence its own venv) and molmo-export. Two things
make the wheel's Python backend work outside NVIDIA's container:

* the backend's stub loads the first `libpython3.X.so` the dynamic loader finds, which may be
  the system's Python rather than the environment's: LD_LIBRARY_PATH starts with the
  environment interpreter's LIBDIR (so that interpreter must be built with --enable-shared);
* the stub ignores PYTHONPATH: the repository's config names the environment in
  EXECUTION_ENV_PATH (a directory with bin/activate, which the stub sources), see repository.py.

The wheel ships one stub per Python version and none in its backend folder; the server here
gets a private backend folder in a temporary workspace, linking the stub for the environment's
Python version. `stop()` removes the workspace and reports anything the server left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from molmo_runtime.errors import MolmoError

REPO_ROOT = Path(__file__).resolve().parents[2]
# The server environment: MOLMO_TRITON_ENV, else the checkout's .venv-triton.
SERVER_ENV = Path(os.environ.get("MOLMO_TRITON_ENV", REPO_ROOT / ".venv-triton"))

_PROBE = """
import json, sys, sysconfig
from pathlib import Path
info = {"version": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "libdir": sysconfig.get_config_var("LIBDIR"),
        "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))}
try:
    import pytriton
    info["dist"] = str(Path(pytriton.__file__).parent / "tritonserver")
    info["libs"] = str(Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs")
except ImportError as e:
    info["error"] = str(e)
print(json.dumps(info))
"""


class TritonUnavailable(MolmoError):
    """tritonserver cannot run here (no server environment, or its Python is not shared)."""


@dataclass(frozen=True)
class Distribution:
    """The bundled tritonserver and what its Python backend needs from the environment."""

    env: Path
    server: Path         # bin/tritonserver
    backend: Path        # backends/python: libtriton_python.so + triton_python_backend_utils.py
    stub: Path           # triton_python_backend_stub for the environment's Python version
    ld_library_path: str

    @classmethod
    def find(cls, env: str | os.PathLike[str] = SERVER_ENV) -> Distribution:
        env = Path(env).absolute()
        python = env / "bin" / "python"
        if not python.exists():
            raise TritonUnavailable(f"no server environment at {env}: run "
                                    "`make .venv-triton/.installed` (or set MOLMO_TRITON_ENV)")
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                               timeout=60)
        if probe.returncode != 0:
            raise TritonUnavailable(f"{python} failed: {probe.stderr.strip()[-500:]}")
        info = json.loads(probe.stdout)
        if "error" in info:
            raise TritonUnavailable(f"nvidia-pytriton is not installed in {env} ({info['error']}):"
                                    " run `make .venv-triton/.installed`")
        if not info["shared"]:
            raise TritonUnavailable(
                f"{python} is not built as a shared library (--enable-shared): Triton's "
                "Python-backend stub needs libpython; use a Python built with it (pyenv: "
                "PYTHON_CONFIGURE_OPTS=--enable-shared)")
        dist = Path(info["dist"])
        stub = dist / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonUnavailable(f"nvidia-pytriton has no Python-backend stub for Python "
                                    f"{info['version']} ({stub})")
        return cls(env, dist / "bin" / "tritonserver", dist / "backends" / "python", stub,
                   f"{info['libdir']}:{info['libs']}")


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class StopReport:
    """What stop() found: a clean stop has exit code 0, nothing killed, nothing left over."""

    exit_code: int | None = None
    killed: list[int] = field(default_factory=list)       # pids that had to be SIGKILLed
    leftover_shm: list[str] = field(default_factory=list)  # shared-memory regions removed

    @property
    def clean(self) -> bool:
        return self.exit_code == 0 and not self.killed and not self.leftover_shm


class TritonServer:
    """`with TritonServer(repo) as server:` starts tritonserver and waits until it is ready;
    `server.http_url` / `server.grpc_url` are host:port strings for tritonclient."""

    def __init__(self, repository: str | os.PathLike[str], *,
                 dist: Distribution | None = None, ready_timeout_s: float = 180.0,
                 exit_timeout_s: int = 30, log_verbose: int = 0) -> None:
        self.repository = Path(repository).absolute()
        self.dist = dist or Distribution.find()
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.process: subprocess.Popen[bytes] | None = None
        self.workspace: Path | None = None
        self.stop_report: StopReport | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[2]}/metrics"

    @property
    def log_path(self) -> Path:
        assert self.workspace is not None
        return self.workspace / "tritonserver.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AssertionError):
            return ""

    def start(self) -> TritonServer:
        self.workspace = Path(tempfile.mkdtemp(prefix="molmo-triton-"))
        backend = self.workspace / "backends" / "python"
        backend.mkdir(parents=True)
        for f in self.dist.backend.iterdir():
            if f.is_file():
                (backend / f.name).symlink_to(f)
        (backend / "triton_python_backend_stub").symlink_to(self.dist.stub)
        self.ports = free_ports(3)
        # A prefix of our own names the Python backend's shared-memory regions: stop() can
        # then tell whether the server left any behind.
        self.shm_prefix = f"molmo_triton_{os.getpid()}_{self.ports[0]}_"
        cmd = [str(self.dist.server), f"--model-repository={self.repository}",
               f"--backend-directory={self.workspace / 'backends'}",
               "--http-address=127.0.0.1", f"--http-port={self.ports[0]}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.ports[1]}",
               "--metrics-address=127.0.0.1", f"--metrics-port={self.ports[2]}",
               "--allow-gpu-metrics=false", "--disable-auto-complete-config",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.log_verbose}"]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in (self.dist.ld_library_path, env.get("LD_LIBRARY_PATH")) if p)
        with open(self.log_path, "wb") as log:
            # Its own session: stop() can find the stub processes by their process group.
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_stop_with_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MolmoError(f"tritonserver exited with code {self.process.returncode} "
                                 f"before it was ready; its log ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise MolmoError(f"tritonserver was not ready after {self.ready_timeout_s:.0f} s; its "
                         f"log ends:\n{self.log_tail()}")

    def _group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> StopReport:
        """SIGTERM (Triton unloads its models and stops its stubs), wait, then SIGKILL whatever
        is left in the server's process group; remove the workspace. Idempotent."""
        report = self.stop_report or StopReport()
        if self.process is not None and self.stop_report is None:
            pgid = self.process.pid
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                report.exit_code = self.process.wait(timeout=self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                report.killed.append(self.process.pid)
                self.process.kill()
                self.process.wait()
            for _ in range(20):  # stubs get a moment to exit after the server
                if not self._group_alive(pgid):
                    break
                time.sleep(0.1)
            else:
                report.killed += _group_pids(pgid)
                os.killpg(pgid, signal.SIGKILL)
            shm = Path("/dev/shm")
            if shm.is_dir():
                for region in shm.glob(f"{self.shm_prefix}*"):
                    report.leftover_shm.append(region.name)
                    region.unlink(missing_ok=True)
            self.stop_report = report
        if self.workspace is not None and self.workspace.exists():
            import shutil

            keep = os.environ.get("MOLMO_TRITON_KEEP_LOG")
            if keep:  # debugging: the log outlives the workspace
                shutil.copyfile(self.log_path, keep)
            shutil.rmtree(self.workspace)
        return report

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launching thread dies (a killed test run
    or benchmark must not leave a server behind; Linux only, elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids
