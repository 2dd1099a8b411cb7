"""The decoder's weights on 2 MiB pages (Linux transparent huge pages).

A decode step reads every weight once. ONNX Runtime keeps the weights (prepacked) in anonymous
memory that it maps while building a session; where transparent huge pages are set to
"madvise" (a common default, and this project's machines) that memory stays on 4 KiB pages,
and streaming gigabytes through 4 KiB pages costs TLB misses at every page. After the decoder
session is built, the memory it mapped is collapsed into 2 MiB pages with MADV_COLLAPSE
(Linux >= 6.1), in a background thread so that opening returns at once and the first request
overlaps the copy. Measured on a 2-vCPU AVX-512 EPYC, interleaved (docs/fused_decoder.md):
decode steps 0.66-0.82x (bench-0.5b fp32) and 0.90-0.91x (7B-D int4) of the 4 KiB-page time.

Only the address ranges that were mapped while the session was built are touched: collapsing
also populates untouched pages of a range, so the KV cache (preallocated, filled as the context
grows) and the rest of the process are left alone. Nothing changes in what is computed. Where
the kernel refuses (older kernels, THP "never"), the pages stay as they are and the reason is
kept in `HugePages.error`. MOLMO_HUGE_PAGES=0 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

MADV_COLLAPSE = 25  # include/uapi/asm-generic/mman-common.h, Linux 6.1
HUGE_PAGE = 2 * 2**20
ENV = "MOLMO_HUGE_PAGES"

Ranges = list[tuple[int, int]]


@functools.cache
def libc_madvise() -> Any:
    """libc's madvise(addr, length, advice), errno kept for ctypes.get_errno()."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def anonymous_ranges(maps: str | None = None) -> Ranges:
    """[start, end) of the process's private writable anonymous mappings (/proc/self/maps lines
    without a path, and malloc's [heap]), less thread stacks (right after a PROT_NONE guard
    page; the kernel refuses to collapse them, and they are not weights)."""
    if maps is None:
        with open("/proc/self/maps") as f:
            maps = f.read()
    out, guard_end = [], -1
    for line in maps.splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        anonymous = len(fields) == 5 or (len(fields) == 6 and fields[5] == "[heap]")
        if anonymous and fields[1] == "rw-p" and start != guard_end:
            out.append((start, end))
        guard_end = end if fields[1] == "---p" else -1
    return out


def new_ranges(before: Ranges, after: Ranges) -> Ranges:
    """The parts of `after` not covered by `before` (the kernel merges an adjacent new mapping
    into an old one, so whole ranges cannot be compared)."""
    out, before = [], sorted(before)
    for start, end in after:
        for b0, b1 in before:
            if b1 <= start or b0 >= end:
                continue
            if b0 > start:
                out.append((start, b0))
            start = max(start, b1)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def huge_aligned(ranges: Ranges) -> Ranges:
    """Each range shrunk to whole 2 MiB pages (a partial huge page would reach into memory
    that is not the session's)."""
    out = []
    for start, end in ranges:
        s, e = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if e > s:
            out.append((s, e))
    return out


@dataclass
class HugePages:
    """The collapse of one session's memory: what was asked, what the kernel did."""

    requested: int = 0  # bytes in whole 2 MiB pages
    collapsed: int = 0
    seconds: float = 0.0
    error: str | None = None
    _thread: threading.Thread | None = None

    def wait(self) -> HugePages:
        if self._thread is not None:
            self._thread.join()
        return self

    def summary(self) -> str:
        self.wait()
        if not self.collapsed:
            return f"weights on 4 KiB pages ({self.error or 'nothing to collapse'})"
        refused = f"; the rest refused: {self.error}" if self.error else ""
        return (f"weights on 2 MiB pages: {self.collapsed / 1e9:.2f} of "
                f"{self.requested / 1e9:.2f} GB in {self.seconds:.1f} s{refused}")

    def _collapse(self, ranges: Ranges) -> None:
        """One 2 MiB page per call: a whole range at once needs all its huge pages free at
        once, which a machine whose page cache fills the memory (after reading a checkpoint)
        does not have; page by page, each collapse frees the 4 KiB pages it copied. Pages
        refused the first time are tried once more, after the others freed theirs."""
        start = time.perf_counter()
        madvise = libc_madvise()
        pages = [a for s, e in ranges for a in range(s, e, HUGE_PAGE)]
        for _ in range(2):
            refused, self.error = [], None
            for address in pages:
                if madvise(address, HUGE_PAGE, MADV_COLLAPSE) == 0:
                    self.collapsed += HUGE_PAGE
                else:
                    # EINVAL: no MADV_COLLAPSE (kernel < 6.1), THP "never", or a range marked
                    # not to (the thread pool's stacks); ENOMEM / EAGAIN: no free 2 MiB page
                    refused.append(address)
                    self.error = f"madvise(MADV_COLLAPSE): {os.strerror(ctypes.get_errno())}"
            pages = refused
        self.seconds = time.perf_counter() - start


@contextmanager
def collapse_new_memory(enabled: bool = True) -> Iterator[HugePages]:
    """Collapse the anonymous memory mapped inside the `with` block into 2 MiB pages, in a
    background thread started when the block ends (`.wait()` joins it)."""
    result = HugePages()
    if not enabled:
        result.error = "off"
        yield result
        return
    if not sys.platform.startswith("linux"):
        result.error = "not Linux"
        yield result
        return
    before = anonymous_ranges()
    yield result
    ranges = huge_aligned(new_ranges(before, anonymous_ranges()))
    result.requested = sum(e - s for s, e in ranges)
    if ranges:
        result._thread = threading.Thread(target=result._collapse, args=(ranges,),
                                          name="molmo-huge-pages", daemon=True)
        result._thread.start()
