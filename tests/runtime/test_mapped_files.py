"""Mapped weight-file pages given back while and after a session is built
(molmo_runtime.mapped_files): which mappings are chosen, that no byte is lost (not even a written
one), and that the decoder computes the same logits either way."""

from __future__ import annotations

import json
import mmap
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from molmo_runtime import mapped_files as mf
from molmo_runtime.backends.ort import OrtBackend
from molmo_runtime.graph_io import DECODER
from molmo_runtime.manifest import MANIFEST_NAME, file_record, load_manifest
from tests.runtime.backend_probe import prefill_logits

MiB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="/proc/self/maps, madvise")


def test_file_ranges_are_the_named_files_mappings_only() -> None:
    maps = ("7f0000000000-7f0000400000 rw-p 00000000 08:01 456 /w/my dir/decoder.onnx.data\n"
            "7f0000400000-7f0000600000 rw-p 00000000 00:00 0\n"
            "7f0000600000-7f0000700000 r--p 00400000 08:01 456 /w/my dir/decoder.onnx.data\n"
            "7f0000700000-7f0000800000 r--p 00000000 08:01 457 /w/my dir/decoder.onnx\n")
    assert mf.file_ranges(["/w/my dir/decoder.onnx.data"], maps) == [
        (0x7F0000000000, 0x7F0000400000), (0x7F0000600000, 0x7F0000700000)]
    assert mf.file_ranges([], maps) == []


def test_off_or_no_files_means_nothing_is_touched(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv(mf.ENV, "0")
    assert not mf.enabled_by_env()
    data = tmp_path / "w.data"
    data.write_bytes(b"x" * 4096)
    with mf.page_out_files([data], mf.enabled_by_env()) as off:
        pass
    assert off.error == "off" and off.passes == 0
    assert off.summary() == "mapped weight pages kept (w.data: off)"
    with mf.page_out_files([tmp_path / "missing.data"]) as none:
        pass
    assert none.files == [] and none.passes == 0


def _resident(start: int, end: int) -> int:
    """Resident bytes of the mapping [start, end) (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        fields = line.split()
        if "-" in fields[0] and fields[0].count("-") == 1 and ":" not in fields[0]:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= start < hi:
                rss = next(x for x in lines[i + 1:] if x.startswith("Rss:"))
                return int(rss.split()[1]) * 1024
    raise AssertionError("mapping not found")


def _in_memory_fs(path: Path) -> bool:
    """Whether `path` is on tmpfs/ramfs, whose pages are memory (paging them out needs swap)."""
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, kind = line.split()[:3]
            if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs")


@linux_only
def test_pages_go_and_every_byte_stays_even_a_written_one(tmp_path: Path) -> None:
    """Private file mapping, as ONNX Runtime maps external data: clean pages are given back
    (or the kernel's refusal is said), read back unchanged, and a page the process wrote
    (copy-on-write) keeps what was written."""
    path = tmp_path / "weights.data"
    expected = np.arange(8 * MiB, dtype=np.float32)
    expected.tofile(path)
    with open(path, "r+b") as f:
        region = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = np.frombuffer(region, np.float32)
    assert float(data.sum(dtype=np.float64)) == float(expected.sum(dtype=np.float64))  # touch
    data[12345] = -1.0  # a written page
    start = data.__array_interface__["data"][0]
    before = _resident(start, start + data.nbytes)
    assert before >= 30 * MiB
    with mf.page_out_files([path]) as result:
        pass
    after = _resident(start, start + data.nbytes)
    if result.error is None:
        assert result.passes >= 1
        if not _in_memory_fs(path.resolve()):
            assert after < before // 2, (before, after)
    else:
        assert "MADV_PAGEOUT" in result.error
    assert data[12345] == -1.0
    expected[12345] = -1.0
    np.testing.assert_array_equal(data, expected)
    del data
    region.close()


@pytest.fixture
def demo_with_external_data(demo_artifact: Path, tmp_path: Path) -> Path:
    """A copy of the demo artifact whose decoder keeps its weights in decoder.onnx.data."""
    import onnx

    from molmo_calibration.graph_tools import save_model

    art = tmp_path / "demo"
    shutil.copytree(demo_artifact, art)
    rel = "onnx/decoder.onnx"
    save_model(onnx.load(str(art / rel)), art / rel, external=True)
    raw = json.loads((art / MANIFEST_NAME).read_text())
    raw["graphs"][DECODER]["external_data"] = [rel + ".data"]
    for r in (rel, rel + ".data"):
        raw["files"][r] = file_record(art, r)
    (art / MANIFEST_NAME).write_text(json.dumps(raw))
    return art


def test_the_decoder_computes_the_same_logits_with_its_pages_given_back(
        demo_with_external_data: Path) -> None:
    manifest = load_manifest(demo_with_external_data, "size")
    kept = OrtBackend(manifest, threads=1, graphs=(DECODER,), page_out=False)
    given = OrtBackend(manifest, threads=1, graphs=(DECODER,), page_out=True)
    assert kept.page_outs[DECODER].error == "off"
    out = given.page_outs[DECODER]
    assert [Path(f).name for f in out.files] == ["decoder.onnx.data"]
    if sys.platform.startswith("linux"):
        assert out.passes >= 1 or out.error
    assert out.summary().startswith("mapped weight pages ")
    np.testing.assert_array_equal(prefill_logits(kept, manifest.dims.d_model),
                                  prefill_logits(given, manifest.dims.d_model))
