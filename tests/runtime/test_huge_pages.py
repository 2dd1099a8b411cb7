"""The decoder's weights collapsed into 2 MiB pages (molmo_runtime.huge_pages): which memory is
chosen, and that collapsing changes no byte and no output."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from molmo_runtime import huge_pages as hp
from molmo_runtime.backends.ort import OrtBackend
from molmo_runtime.graph_io import DECODER
from molmo_runtime.manifest import load_manifest
from tests.runtime.backend_probe import prefill_logits

MiB = 2**20
MAPS = """\
55d0a0000000-55d0a0200000 r--p 00000000 08:01 123 /usr/bin/python3.11
55d0a1000000-55d0a3000000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
7f0000400000-7f0000600000 rw-p 00000000 08:01 456 /work/a/decoder.onnx.data
7f0000600000-7f0000601000 ---p 00000000 00:00 0
7f0000601000-7f0000e01000 rw-p 00000000 00:00 0
7f0000e01000-7f0001000000 r--p 00000000 00:00 0
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
"""


def test_anonymous_ranges_are_private_writable_memory_without_a_file_and_not_stacks() -> None:
    assert hp.anonymous_ranges(MAPS) == [(0x55D0A1000000, 0x55D0A3000000),  # [heap]
                                         (0x7F0000000000, 0x7F0000400000)]
    # not: the file-backed data, the read-only range, the thread stack after its guard page,
    # the main [stack]


@pytest.mark.parametrize(("before", "after", "new"), [
    ([], [(0, 10)], [(0, 10)]),
    ([(0, 10)], [(0, 10)], []),
    ([(0, 10)], [(0, 16)], [(10, 16)]),  # the kernel merged a new mapping into an old one
    ([(4, 6)], [(0, 10)], [(0, 4), (6, 10)]),
    ([(0, 2), (4, 6), (12, 20)], [(0, 14)], [(2, 4), (6, 12)]),
    ([(0, 10)], [(20, 30)], [(20, 30)]),
])
def test_new_ranges_are_what_after_adds_to_before(before: hp.Ranges, after: hp.Ranges,
                                                 new: hp.Ranges) -> None:
    assert hp.new_ranges(before, after) == new


def test_ranges_shrink_to_whole_huge_pages() -> None:
    assert hp.huge_aligned([(1, 5 * MiB), (6 * MiB, 7 * MiB), (8 * MiB, 12 * MiB)]) == [
        (2 * MiB, 4 * MiB), (8 * MiB, 12 * MiB)]


def test_off_means_nothing_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hp.ENV, "0")
    assert not hp.enabled_by_env()
    with hp.collapse_new_memory(hp.enabled_by_env()) as result:
        data = np.ones(16 * MiB // 4, np.float32)
    assert result.wait().requested == 0 and result.collapsed == 0
    assert result.summary() == "weights on 4 KiB pages (off)"
    del data


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps, madvise")
def test_collapse_keeps_every_byte() -> None:
    """What the kernel does depends on the machine (MADV_COLLAPSE needs Linux >= 6.1 and free
    2 MiB pages), so the test asserts what holds everywhere: the new memory is found, the kernel
    either collapsed it or the refusal is said, and the data is the same."""
    with hp.collapse_new_memory() as result:
        # a new anonymous mapping whatever malloc's state (after other tests it may reuse
        # memory it already holds, which is not new and rightly not touched)
        region = mmap.mmap(-1, 48 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        data = np.frombuffer(region, np.float32)
        data[:] = np.arange(data.size, dtype=np.float32)
    result.wait()
    assert result.requested >= 40 * MiB
    assert result.collapsed > 0 or result.error
    assert 0 <= result.collapsed <= result.requested
    np.testing.assert_array_equal(data, np.arange(data.size, dtype=np.float32))
    del data
    region.close()


def test_the_decoder_computes_the_same_logits_on_either_page_size(demo_artifact: Path) -> None:
    manifest = load_manifest(demo_artifact, "size")
    plain = OrtBackend(manifest, threads=1, graphs=(DECODER,), huge_pages=False)
    huge = OrtBackend(manifest, threads=1, graphs=(DECODER,), huge_pages=True)
    assert plain.huge_pages.requested == 0
    huge.huge_pages.wait()
    np.testing.assert_array_equal(prefill_logits(plain, manifest.dims.d_model),
                                  prefill_logits(huge, manifest.dims.d_model))
