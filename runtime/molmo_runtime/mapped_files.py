"""Give back the pages of weight files that ONNX Runtime has mapped but no longer reads.

ONNX Runtime maps a graph's external data (its .onnx.data file) into the process, tensor by
tensor, while it builds a session. Kernels that prepack a weight copy it into buffers of their
own, and the mapped pages already copied stay resident until the session is built; some inputs
stay mapped for good though never read again (MatMulNBits at accuracy level 4 keeps its scales
mapped besides the packed copy). So while a session is built, and once after, this process's
mappings of the graph's data files are paged out with madvise(MADV_PAGEOUT) (Linux >= 5.4),
every PERIOD seconds. Measured on the 7B-D int4 decoder alone (docs/runtime.md): resident after
building 5.84 -> 5.01 GiB, peak 6.15 -> 5.36 GiB; 0.04 GiB of the file resident after decoding;
the decode step unchanged (0.99-1.01x, interleaved).

Nothing computed can change: the kernel reclaims a clean page of a file mapping by dropping it
and reads it back from the file if it is touched again (a weight a kernel reads in place comes
back on first use, at the cost of a read); a page that was written (copy-on-write) is not
dropped: without swap it stays, with swap it is swapped out, never lost. Elsewhere (not Linux,
older kernels) nothing is done and `PageOut.error` says why. MOLMO_PAGE_OUT=0 turns it off.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from molmo_runtime.containment import inside
from molmo_runtime.huge_pages import libc_madvise
from molmo_runtime.onnx_refs import external_data_locations

MADV_PAGEOUT = 21  # include/uapi/asm-generic/mman-common.h, Linux 5.4
PERIOD = 0.25  # seconds between passes while a session is built
ENV = "MOLMO_PAGE_OUT"


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def file_ranges(paths: Iterable[str | os.PathLike[str]], maps: str | None = None
                ) -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of the given files (/proc/self/maps)."""
    names = {os.path.realpath(p) for p in paths}
    if maps is None:
        with open("/proc/self/maps") as f:
            maps = f.read()
    out = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def data_files(graph: str | os.PathLike[str]) -> list[Path]:
    """The external data files an ONNX graph file names, resolved; ArtifactError for one that
    leads out of the graph's folder."""
    folder = Path(graph).parent
    return [inside(folder, loc, f"external data of {Path(graph).name}")
            for loc in sorted(external_data_locations(graph))]


@dataclass
class PageOut:
    """What was paged out of which files, and why not where the kernel refused."""

    files: list[str] = field(default_factory=list)
    passes: int = 0
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def summary(self) -> str:
        names = ", ".join(Path(f).name for f in self.files) or "no external data"
        if self.error:
            return f"mapped weight pages kept ({names}: {self.error})"
        return f"mapped weight pages given back ({names}: {self.passes} passes)"

    def page_out(self) -> None:
        """One pass over the files' current mappings. A range unmapped (or even reused)
        between reading the maps and the call is harmless: paging out never loses data."""
        madvise = libc_madvise()
        for start, end in file_ranges(self.files):
            if madvise(start, end - start, MADV_PAGEOUT) != 0:
                code = ctypes.get_errno()
                if code == errno.EINVAL:  # no MADV_PAGEOUT (kernel < 5.4); ENOMEM: unmapped
                    self.error = f"madvise(MADV_PAGEOUT): {os.strerror(code)}"
                    return
        self.passes += 1

    def _run(self) -> None:
        while not self._stop.wait(PERIOD) and self.error is None:
            self.page_out()


@contextmanager
def page_out_files(paths: Iterable[str | os.PathLike[str]], enabled: bool = True
                   ) -> Iterator[PageOut]:
    """Page out this process's mappings of `paths` while the block runs and once after it."""
    result = PageOut(files=[str(p) for p in paths if Path(p).is_file()])
    if not enabled:
        result.error = "off"
    elif not sys.platform.startswith("linux"):
        result.error = "not Linux"
    if result.error or not result.files:
        yield result
        return
    thread = threading.Thread(target=result._run, name="molmo-page-out", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        result._stop.set()
        thread.join()
        if result.error is None:
            result.page_out()
