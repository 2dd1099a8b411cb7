"""Waiting until this process's own threads are idle, before timing something.

Thread pools keep spinning after they return: ONNX Runtime's intra-op workers for ~30 ms,
OpenBLAS's worker (numpy's matrix products, e.g. the bandwidth probe) for ~0.1 s, each a whole
core's worth (measured on the 2-core VM of docs/scale.md: the process's CPU time grows by the
sleep's length while it sleeps). On a 2-core machine a step timed while another pool still spins
runs on one core, not two: a decode step started right after the numpy probe read the weights at
0.58 of the probe's bandwidth where, started from idle, it reads ~0.78. Timing loops that
alternate two stacks, or a stack and a probe, call `settle()` before each timed call.
"""

from __future__ import annotations

import time

SLICE_S = 0.01  # sleep in slices of this length ...
IDLE_CPU_S = 0.001  # ... until one in which the whole process used less CPU time than this
SETTLE_MAX_S = 2.0  # pools stop spinning within ~0.1 s; longer means some thread is working


def settle(max_s: float = SETTLE_MAX_S) -> float:
    """Sleep until no thread of this process is spinning; returns the seconds it took.

    Raises RuntimeError when the process keeps using CPU for `max_s`: something works in the
    background (a collapse, a page-out pass) and would share the cores with the timed call.
    """
    start = time.perf_counter()
    while True:
        cpu = time.process_time()
        time.sleep(SLICE_S)
        if time.process_time() - cpu < IDLE_CPU_S:
            return time.perf_counter() - start
        if time.perf_counter() - start > max_s:
            raise RuntimeError(f"this process's threads were still busy after {max_s:.1f} s: a "
                               "call timed now would share the cores with them")
