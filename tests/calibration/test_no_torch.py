"""molmo_calibration never imports torch, not even indirectly (a Jetson quantizes without it)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import molmo_calibration
from tests.conftest import REPO

MODULES = sorted(f"molmo_calibration.{m.name}"
                 for m in pkgutil.iter_modules(molmo_calibration.__path__))


def test_every_calibration_module_imports_without_torch() -> None:
    assert "molmo_calibration.quantize" in MODULES and "molmo_calibration.qdq" in MODULES
    code = ("import sys, importlib\n"
            f"for m in {MODULES!r}: importlib.import_module(m)\n"
            "import molmo_calibration as mc\n"
            "mc.quantize_artifact, mc.load_calibration_set, mc.QualityReport\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"torch was imported: {proc.stdout}{proc.stderr}"


def test_a_whole_quantization_runs_without_torch(tmp_path: object) -> None:
    """Not just the imports: quantize (trt QDQ, both decoder candidates) with torch blocked."""
    code = ("import sys, warnings\n"
            "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
            "from pathlib import Path\n"
            "from tests.calibration.conftest import SYNTHETIC_SET, synthetic_sample\n"
            "from tests.calibration.toy_model import write_toy_artifact\n"
            "from molmo_calibration.quantize import quantize_prepared\n"
            "from molmo_runtime.manifest import load_manifest\n"
            f"root = Path({str(tmp_path)!r})\n"
            "src = write_toy_artifact(root / 'fp32')\n"
            "samples = [synthetic_sample(1, 'calibration'), synthetic_sample(2, 'heldout')]\n"
            "warnings.simplefilter('ignore')\n"
            "quantize_prepared(load_manifest(src), root / 'q', 'trt-int8-qdq', samples,\n"
            "                  SYNTHETIC_SET, new_tokens=2, allow_degraded=True,\n"
            "                  progress=False, log=lambda s: None)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(REPO))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
