"""What every command line tool shares (molmo-export, molmo-verify, molmo-run, molmo-bench,
python -m molmo_calibration): argparse value types that refuse bad values in one line, the
`--debug` flag, and one way to end. Torch-free.

Exit status of every tool:
    0    success
    2    an anticipated error, printed as one line "<prog>: error: ...": a bad option value
         (argparse), bad input or artifact (MolmoError), a missing extra, a file system error
    1    an unexpected exception (a bug, or an error of a library under us), printed as one line
         that says to rerun with --debug for the traceback
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from molmo_runtime.errors import MolmoError, install_command

# Modules that only an extra installs -> that extra (pyproject.toml's optional-dependencies).
MODULE_EXTRAS = {"torch": "export", "onnxscript": "export", "safetensors": "export",
                 "tqdm": "export", "onnx": "export", "onnxruntime": "ort", "tensorrt": "trt",
                 "cuda": "trt", "matplotlib": "bench", "psutil": "bench"}


def one_line(message: str) -> str:
    """A multi-line message as one line (lines after a ':' follow it, others are joined by ';')."""
    parts = [line.strip() for line in str(message).splitlines() if line.strip()]
    out = parts[0] if parts else ""
    for part in parts[1:]:
        out += (" " if out.endswith(":") else "; ") + part
    return out


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="on an unexpected error, show the full traceback instead of one line "
                             "(default: off)")


def run_main(prog: str, body: Callable[[], int | None], debug: bool = False) -> int:
    """Run a CLI's work and turn what it raises into one line on stderr and an exit status."""
    try:
        return body() or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the one place that decides how a CLI ends
        if debug:
            raise
        status, line = describe(e)
        print(f"{prog}: {line}", file=sys.stderr)
        return status


def describe(e: BaseException) -> tuple[int, str]:
    """(exit status, message line) for an exception that ended a command."""
    if isinstance(e, MolmoError):
        return 2, f"error: {one_line(str(e))}"
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        if top in MODULE_EXTRAS:
            extra = MODULE_EXTRAS[top]
            return 2, (f"error: this command needs {top} ({extra} extra), which is not "
                       f"installed here: {install_command(extra)}")
    if isinstance(e, MemoryError):
        return 2, ("error: out of memory; use a smaller model, fewer crops or a shorter "
                   "--max-seq-len, or close other programs")
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return 2, f"error: {e.strerror}{where}"
    detail = one_line(str(e))
    return 1, (f"internal error: {type(e).__name__}" + (f": {detail}" if detail else "")
               + " (rerun with --debug for the traceback)")


# -- argparse value types: a bad value is one line, "argument --x: ...", and exit 2 ------------

def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1; give 1 or more")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def probability(text: str) -> float:
    """A value in (0, 1], as top-p takes."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]")
    return value
