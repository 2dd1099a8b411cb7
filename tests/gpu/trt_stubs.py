"""Prepare the published TensorRT type stubs for mypy (used by `make typecheck`).

tensorrt-stubs 10.13.0.35.1 (PyPI) installs tensorrt/ and tensorrt_bindings/ .pyi files without a
py.typed marker, and they are generated from the pybind11 module with a few lines mypy cannot
read. This copies them to DEST and fixes exactly those lines, nothing else:

  - parameters named `in` (a Python keyword) in 7 plugin methods -> `in_`
  - `import tensorrt_libs` (a runtime-only module with no stubs) -> removed
  - a parameter without default after defaulted ones (add_scale_nd) -> given `= ...`
  - annotations `bool` resolving to the module-level `tensorrt.bool` DataType constant
    -> `builtins.bool`, so calls such as OnnxParser.parse_from_file type-check as bool

Usage: python tests/gpu/trt_stubs.py build/trt-stubs  (then MYPYPATH=build/trt-stubs mypy ...)
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")


def fix_stub_text(text: str) -> str:
    text = re.sub(r"\bin:", "in_:", text)
    text = re.sub(r"^import tensorrt_libs as tensorrt_libs\n", "", text, flags=re.M)
    text = re.sub(r"(: \w+ = None, \w+: \w+)(\) ->)", r"\1 = ...\2", text)
    if re.search(r"^bool: ", text, flags=re.M):  # the module shadows the builtin
        text = re.sub(r"(\w): bool\b", r"\1: builtins.bool", text)
        text = re.sub(r"-> bool\b", "-> builtins.bool", text)
        text = "import builtins\n" + text
    return text


def prepare(dest: Path) -> None:
    try:
        import tensorrt_stubs
    except ImportError:
        sys.exit("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1")
    site = Path(tensorrt_stubs.__file__).resolve().parents[1]
    shutil.rmtree(dest, ignore_errors=True)
    for pkg in PACKAGES:
        shutil.copytree(site / pkg, dest / pkg)
    for f in dest.rglob("*.pyi"):
        f.write_text(fix_stub_text(f.read_text()))


if __name__ == "__main__":
    prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "build/trt-stubs"))
